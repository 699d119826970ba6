"""A real S3-compatible server for the tests: moto's standalone server in its own process on 127.0.0.1.

The job talks to it through the real client stack (boto3 and pyarrow's S3 filesystem), pointed at it by
AWS_ENDPOINT_URL exactly as a user points the job at MinIO or R2. With auth=True the server checks
signatures and access keys (moto's INITIAL_NO_AUTH_ACTION_COUNT=0), so wrong credentials are refused.
"""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

from servers import free_port, wait_listening



@contextmanager
def moto_server(log: Path, auth: bool = False):
    """Start the server; yield the environment a client needs (endpoint, region, test credentials)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "INITIAL_NO_AUTH_ACTION_COUNT"}
    if auth:
        env["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                  stdout=out, stderr=subprocess.STDOUT, env=env)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_listening(server, port, log, "moto server")
        yield {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_CONFIG_FILE": os.devnull,  # nothing from the developer's own AWS set-up
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true",
        }
    finally:
        server.terminate()
        server.wait(timeout=30)
