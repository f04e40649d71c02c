"""Server-side modules of the ksrpc stand-in (only the demo)."""
# As in the original: an attribute named like the submodule. Until `ksrpc.server.demo` is
# imported, `RpcClient("ksrpc.server").demo` is this string; the import replaces it with
# the module (so write the whole name, `RpcClient("ksrpc.server.demo")`, to reach it).
demo = "654321"
