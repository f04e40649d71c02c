"""Minimal stand-in for the `ksrpc` 0.8.1 package, shipped with the Rust server.

It only holds what requests and replies name in their pickles
(`ksrpc.client.RpcCall`, `_Self`, `RpcClient`) and the demo module. The server
serves it from memory, after every other finder, so an installed ksrpc wins.
"""
__version__ = "0.8.1"
