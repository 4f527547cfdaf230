#!/usr/bin/env bash
# Vagrant provisioning for pelagos_bpf: `provision.sh deps DIR` installs bcc, libbpf and a venv
# with pyroute2 and the project; `provision.sh test DIR` runs the suite on the box's kernel.
# Why not only scripts/bootstrap: it is apt/Debian-only; Fedora gets the same venv layout here.
set -euo pipefail
mode=$1 dir=$2
cd "$dir"
. /etc/os-release

if [ "$mode" = deps ]; then
  # A wheelhouse from the host (vagrant/test) stands in for PyPI: every later pip uses it.
  if [ -n "${PELAGOS_WHEELHOUSE:-}" ]; then
    printf '[global]\nno-index = true\nfind-links = %s\n' "$PELAGOS_WHEELHOUSE" >/etc/pip.conf
  fi
  fs=$(stat -fc %T /sys/fs/cgroup)
  [ "$fs" = cgroup2fs ] || { echo "provision: /sys/fs/cgroup is $fs, not pure cgroup v2"; exit 1; }
  case "$ID" in
    debian | ubuntu)
      pkgs=(python3-venv python3-pip python3-bpfcc libbpfcc libbpf1 iproute2 kmod linux-libc-dev
        gcc libc6-dev python3-dev)
      # linux-libc-dev: bcc compiles against /usr/include's uapi headers. gcc, libc6-dev,
      # python3-dev: pip builds pelagos_bpf._sys (setup.py). Boxes that already carry all of
      # them (vagrant/build-box) need no mirror.
      if ! dpkg -s "${pkgs[@]}" >/dev/null 2>&1; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pkgs[@]}" >/dev/null
      fi
      ;;
    fedora)
      dnf -y -q install python3 python3-pip python3-bcc libbpf bpftool iproute kmod gcc python3-devel
      bcc_dir=$(/usr/bin/python3 -c 'import bcc, os; print(os.path.dirname(bcc.__file__))')
      /usr/bin/python3 -m venv .venv
      mkdir -p .venv/distro-bcc
      ln -sfn "$bcc_dir" .venv/distro-bcc/bcc
      site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
      echo "$PWD/.venv/distro-bcc" >"$site/distro_bcc.pth"
      .venv/bin/python -m pip install -q -e '.[test]'
      ;;
    *)
      echo "provision: unsupported distribution $ID"
      exit 1
      ;;
  esac
  exit 0
fi

# test: the project's test command, minus the QEMU matrix (this VM's kernel is the one tested).
if command -v apt-get >/dev/null; then
  exec bash scripts/test -m "not matrix"
fi
# scripts/test starts with the apt-based bootstrap; run the rest of it.
.venv/bin/pelagos-bpf compile
exec .venv/bin/python -m pytest -m "not matrix"
