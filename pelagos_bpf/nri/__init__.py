"""NRI (containerd/nri): the mux, ttrpc, NRI's messages, a plugin stub, and our plugin.

Needs the [nri] extra (protobuf). plugin.Plugin (a stub.PluginHandler) is what
`pelagos-bpf agent --nri` runs (agent/nrihost.py); request.py reads what a pod asks for,
grants.py finds the nodes of its device grants. docs/NRI.md is the operator's guide.
"""
