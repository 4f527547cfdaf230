"""NRI (containerd/nri) plugin runtime: the mux, ttrpc, NRI's messages and a plugin stub.

Needs the [nri] extra (protobuf). The agent's NRI logic plugs in as a stub.PluginHandler.
"""
