"""The test modules (bench_mod, capsdk) the servers in these tests import."""
import os
import sys

sys.path.insert(0, os.environ.get("KSRPC_TEST_SERVER_MODULES", os.path.join(
    os.path.dirname(__file__), "..", "..", "tests", "python", "server_modules")))
