"""Sending a workload: open loop (each request leaves at its arrival time whatever the server does; vLLM's and S-LoRA's
way) or closed loop (a fixed number in flight, the next sent when one finishes). Threads, not asyncio: the client is the
standard library's http.client, and a thread per request in flight is cheap at the rates a server sustains."""

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from lora_server.loadtest.client import Endpoint, Result, stream_request
from lora_server.loadtest.workload import Job

Progress = Callable[[], None]


def run_open_loop(endpoint: Endpoint, route: str, base_model: str, jobs: list[Job], progress: Progress,
                  max_in_flight: int = 1024) -> tuple[list[Result], float]:
    """Every job starts at its arrival time; (results in job order, wall seconds). `max_in_flight` only caps the
    client's threads: should the server fall that far behind, later requests leave late (their `sent_s` says so)."""
    results: list[Result | None] = [None] * len(jobs)
    slots = threading.BoundedSemaphore(max_in_flight)
    threads = []
    started = time.perf_counter()

    def send(index: int, job: Job) -> None:
        try:
            results[index] = stream_request(endpoint, route, base_model, job, started)
        finally:
            slots.release()
            progress()

    for index, job in enumerate(jobs):
        delay = job.arrival_s - (time.perf_counter() - started)
        if delay > 0:
            time.sleep(delay)
        slots.acquire()
        thread = threading.Thread(target=send, args=(index, job), daemon=True)
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()
    wall_s = time.perf_counter() - started
    assert all(result is not None for result in results)
    return [result for result in results if result is not None], wall_s


def run_closed_loop(endpoint: Endpoint, route: str, base_model: str, jobs: list[Job], concurrency: int,
                    progress: Progress) -> tuple[list[Result], float]:
    """`concurrency` requests in flight until the jobs run out; arrival times are ignored."""
    started = time.perf_counter()

    def send(job: Job) -> Result:
        try:
            return stream_request(endpoint, route, base_model, job, started)
        finally:
            progress()

    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(send, jobs))
    return results, time.perf_counter() - started
