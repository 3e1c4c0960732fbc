"""Runs a Celery worker and a producer through skiff: the broker in
database 1 and the results in database 0 under the `celery` key prefix.

Usage: SKIFF_PORT=port celery_through_skiff.py. Prints one line per
result and exits non-zero when a result is wrong or late.
"""

import os
import subprocess
import sys

from celery import Celery, chord, group

PORT = os.environ["SKIFF_PORT"]
app = Celery(
    "celery_through_skiff",
    broker=f"redis://127.0.0.1:{PORT}/1",
    backend=f"redis://127.0.0.1:{PORT}/0",
)
app.conf.task_acks_late = True


@app.task
def add(x, y):
    return x + y


@app.task
def total(values):
    return sum(values)


@app.task(bind=True, max_retries=2)
def flaky(self, n):
    if self.request.retries < 1:
        raise self.retry(countdown=0.2)
    return n * 2


def produce():
    # Each result is awaited over pub/sub on celery-task-meta-<id>, which
    # unsubscribes from one task and subscribes to the next.
    assert add.delay(2, 3).get(timeout=10) == 5
    print("add ok", flush=True)
    assert flaky.delay(21).get(timeout=10) == 42
    print("retry ok", flush=True)
    assert group(add.s(i, i) for i in range(5))().get(timeout=10) == [0, 2, 4, 6, 8]
    print("group ok", flush=True)
    assert chord(add.s(i, 1) for i in range(4))(total.s()).get(timeout=10) == 10
    print("chord ok", flush=True)


if __name__ == "__main__":
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "celery_through_skiff", "worker",
         "-P", "solo", "--without-mingle", "--without-gossip", "--without-heartbeat",
         "--loglevel=warning"],
        cwd=os.path.dirname(os.path.abspath(__file__)),
    )
    try:
        produce()
    finally:
        worker.terminate()
        worker.wait(timeout=10)
