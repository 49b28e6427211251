"""``cam-vllm load-test``: a storm of streaming completions against a running server, then a leak check.

Clients behind a load balancer disconnect mid-stream, pools run full and vLLM preempts requests.
This drives a server (any OpenAI-compatible vLLM, with or without a KV policy) the same way:
``requests`` streaming completions of random prompt and output lengths, at most ``concurrency``
in flight, a fraction of them dropped by the client after a random number of chunks. Afterwards
the server must be as it was: healthy, no KV block in use (``vllm:kv_cache_usage_perc``), no
per-request state left in the plugin (``cam_vllm:requests_tracked``), and a fixed greedy probe
returns the text it returned before the storm.

Prompts are token ids (``vocab`` bounds them), so lengths are exact for any tokenizer, and
``ignore_eos`` makes every completed request produce exactly its ``max_tokens``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from cam_vllm.errors import CamVllmError
from cam_vllm.subcommands import register_subcommand


@dataclass(frozen=True)
class StormConfig:
    requests: int = 200
    concurrency: int = 48
    abort_fraction: float = 1 / 3
    prompt_tokens: tuple[int, int] = (32, 768)  # inclusive range
    max_tokens: tuple[int, int] = (8, 128)
    vocab: int = 800  # prompt token ids are drawn from [3, vocab)
    seed: int = 0
    probe_tokens: int = 24
    request_timeout: float = 600.0
    settle_seconds: float = 60.0  # how long aborted requests may take to leave the engine
    # share of requests asking for the full cache (vllm_xargs {"kv_policy": "none"}; the server
    # must allow it: --kv-allow-full-cache-requests)
    full_cache_fraction: float = 0.0

    def __post_init__(self) -> None:
        for name in ("prompt_tokens", "max_tokens"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                raise CamVllmError(f"load test: {name} must be a range 1 <= lo <= hi, got {lo}..{hi}")
        if self.requests < 1 or self.concurrency < 1:
            raise CamVllmError("load test: requests and concurrency must be >= 1")
        if not 0.0 <= self.full_cache_fraction <= 1.0:
            raise CamVllmError(
                f"load test: full_cache_fraction must be in [0, 1], got {self.full_cache_fraction}"
            )
        if not 0.0 <= self.abort_fraction <= 1.0:
            raise CamVllmError(f"load test: abort_fraction must be in [0, 1], got {self.abort_fraction}")
        if self.vocab < 4:
            raise CamVllmError(f"load test: vocab must be >= 4, got {self.vocab}")


@dataclass
class StormReport:
    """What happened; ``ok`` when nothing failed and nothing leaked."""

    requests: int = 0
    completed: int = 0
    aborted: int = 0  # dropped by the client on purpose
    errors: list[str] = field(default_factory=list)  # anything else: non-200, short output, exception
    preemptions: int = 0  # vllm:num_preemptions_total during the storm
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    latency_p50_s: float = 0.0
    latency_p99_s: float = 0.0
    ttft_p50_s: float = 0.0
    ttft_p99_s: float = 0.0
    healthy: bool = False
    kv_blocks_in_use_ratio: float = -1.0  # vllm:kv_cache_usage_perc after the storm
    requests_tracked: float = -1.0  # cam_vllm:requests_tracked after the storm (absent: -1)
    requests_tracked_peak: float = -1.0  # its highest value sampled during the storm
    worker_stashed: float = -1.0  # cam_vllm:worker_requests_stashed after the storm (absent: -1)
    worker_stashed_peak: float = -1.0  # its highest value sampled during the storm
    full_cache_requests: int = 0  # requests sent asking for the full cache
    full_cache_peak: float = -1.0  # cam_vllm:requests_full_cache_running, highest sampled
    full_cache_running: float = -1.0  # ... after the storm (absent: -1)
    kv_blocks_in_use_peak: float = 0.0  # vllm:kv_cache_usage_perc, highest sampled
    running_after: float = -1.0
    waiting_after: float = -1.0
    probe_before: str = ""
    probe_after: str = ""

    @property
    def leaks(self) -> list[str]:
        found = []
        if self.kv_blocks_in_use_ratio != 0.0:
            found.append(
                f"KV blocks in use after the storm (vllm:kv_cache_usage_perc {self.kv_blocks_in_use_ratio})"
            )
        if self.requests_tracked > 0:
            found.append(
                f"plugin state left for {self.requests_tracked:g} requests (cam_vllm:requests_tracked)"
            )
        if self.worker_stashed > 0:
            found.append(
                f"worker stash rows left for {self.worker_stashed:g} requests "
                "(cam_vllm:worker_requests_stashed)"
            )
        if self.full_cache_running > 0:
            found.append(
                f"full-cache registrations left for {self.full_cache_running:g} requests "
                "(cam_vllm:requests_full_cache_running)"
            )
        if self.running_after or self.waiting_after:
            found.append(f"requests left: running {self.running_after:g}, waiting {self.waiting_after:g}")
        return found

    @property
    def ok(self) -> bool:
        return self.healthy and not self.errors and not self.leaks and self.probe_after == self.probe_before

    def summary(self) -> dict[str, Any]:
        out = asdict(self)
        out["leaks"] = self.leaks
        out["ok"] = self.ok
        out["errors"] = self.errors[:20]
        out["num_errors"] = len(self.errors)
        return out


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {metric name: value summed over its label sets} (no ``# `` lines)."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_part, _, value = line.rpartition(" ")
        name = name_part.split("{", 1)[0]
        try:
            values[name] = values.get(name, 0.0) + float(value)
        except ValueError:
            continue
    return values


def peak_running(text: str) -> float | None:
    """The most requests running at once, from one ``/metrics`` scrape (label sets summed);
    None where ``cam_vllm:scheduler_running_requests`` is absent."""
    import re

    buckets: dict[float, float] = {}
    for labels, value in re.findall(
        r"^cam_vllm:scheduler_running_requests_bucket\{(.*)\} (\S+)$", text, re.M
    ):
        le = float(re.search(r'(?:^|,)le="([^"]+)"', labels).group(1))
        buckets[le] = buckets.get(le, 0.0) + float(value)
    return peak_from_buckets(buckets) if buckets else None


def peak_from_buckets(cumulative: dict[float, float]) -> float:
    """The most requests running at once, from the cumulative bucket counts of
    ``cam_vllm:scheduler_running_requests`` (``{le: count}``, ``inf`` included) or their increase
    over a window: the smallest bound every observation is under."""
    total = cumulative.get(float("inf"), 0.0)
    if total <= 0:
        return 0.0
    return min(le for le, count in cumulative.items() if count >= total)


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class _Storm:
    def __init__(self, base_url: str, model: str | None, config: StormConfig, progress: bool) -> None:
        import httpx

        self.base = base_url.rstrip("/")
        self.model = model
        self.config = config
        self.progress = progress
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(config.request_timeout, connect=30.0))
        self.report = StormReport(requests=config.requests)
        self.latencies: list[float] = []
        self.ttfts: list[float] = []

    async def metrics(self) -> dict[str, float]:
        r = await self.client.get(f"{self.base}/metrics")
        r.raise_for_status()
        return parse_metrics(r.text)

    async def resolve_model(self) -> None:
        if self.model is None:
            r = await self.client.get(f"{self.base}/v1/models")
            r.raise_for_status()
            self.model = r.json()["data"][0]["id"]

    async def probe(self) -> str:
        rng = random.Random(12345)
        prompt = [rng.randrange(3, self.config.vocab) for _ in range(self.config.prompt_tokens[1])]
        body = {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": self.config.probe_tokens,
            "temperature": 0,
        }
        r = await self.client.post(f"{self.base}/v1/completions", json=body)
        if r.status_code != 200:
            raise CamVllmError(f"load test: the probe failed with HTTP {r.status_code}: {r.text[:300]}")
        return r.json()["choices"][0]["text"]

    async def one(self, i: int, rng: random.Random, gate: asyncio.Semaphore, bar: Any) -> None:
        c = self.config
        prompt = [rng.randrange(3, c.vocab) for _ in range(rng.randint(*c.prompt_tokens))]
        max_tokens = rng.randint(*c.max_tokens)
        drop_after = rng.randint(1, max(1, max_tokens // 2)) if rng.random() < c.abort_fraction else None
        body = {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": rng.choice([0.0, 0.8]),
            "seed": i,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if c.full_cache_fraction and rng.random() < c.full_cache_fraction:
            body["vllm_xargs"] = {"kv_policy": "none"}
            self.report.full_cache_requests += 1
        async with gate:
            start = time.monotonic()
            first: float | None = None
            chunks, usage, finish = 0, None, None
            try:
                async with self.client.stream("POST", f"{self.base}/v1/completions", json=body) as r:
                    if r.status_code != 200:
                        text = (await r.aread()).decode(errors="replace")
                        self.report.errors.append(f"request {i}: HTTP {r.status_code}: {text[:200]}")
                        return
                    async for line in r.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        event = json.loads(line[6:])
                        if "error" in event:
                            self.report.errors.append(f"request {i}: error event {event['error']}")
                            return
                        if event.get("usage"):
                            usage = event["usage"]
                        for choice in event.get("choices", []):
                            if choice.get("text"):
                                chunks += 1
                                first = first if first is not None else time.monotonic()
                            finish = choice.get("finish_reason") or finish
                        if drop_after is not None and chunks >= drop_after:
                            self.report.aborted += 1
                            return  # leaving the block closes the connection: vLLM aborts the request
            except Exception as exc:  # noqa: BLE001 - every failure is a finding, reported by type
                self.report.errors.append(f"request {i}: {type(exc).__name__}: {exc}")
                return
            finally:
                bar.update(1)
            if usage is None or usage.get("completion_tokens") != max_tokens or finish != "length":
                self.report.errors.append(
                    f"request {i}: expected {max_tokens} tokens and finish 'length', "
                    f"got usage {usage}, finish {finish}"
                )
                return
            self.report.completed += 1
            self.report.prompt_tokens += usage["prompt_tokens"]
            self.report.completion_tokens += usage["completion_tokens"]
            self.latencies.append(time.monotonic() - start)
            if first is not None:
                self.ttfts.append(first - start)

    async def sample(self, stop: asyncio.Event) -> None:
        """Sample the gauges during the storm (shows the pool ran full and the state was there)."""
        while not stop.is_set():
            try:
                m = await self.metrics()
            except Exception:  # noqa: BLE001 - a failed scrape shows up in the final checks
                m = {}
            r = self.report
            r.requests_tracked_peak = max(r.requests_tracked_peak, m.get("cam_vllm:requests_tracked", -1.0))
            stashed = m.get("cam_vllm:worker_requests_stashed", -1.0)
            r.worker_stashed_peak = max(r.worker_stashed_peak, stashed)
            full = m.get("cam_vllm:requests_full_cache_running", -1.0)
            r.full_cache_peak = max(r.full_cache_peak, full)
            r.kv_blocks_in_use_peak = max(r.kv_blocks_in_use_peak, m.get("vllm:kv_cache_usage_perc", 0.0))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.2)

    async def settle(self) -> None:
        """Wait for the aborted requests to leave, then read the engine's state after a probe (its
        steps refresh vLLM's scheduler gauges, which are sampled only when the engine steps)."""
        deadline = time.monotonic() + self.config.settle_seconds
        while True:
            await asyncio.sleep(2.0)
            self.report.probe_after = await self.probe()
            await asyncio.sleep(1.0)  # cam-vllm's gauges are flushed every 0.25 s
            m = await self.metrics()
            r = self.report
            r.kv_blocks_in_use_ratio = m.get("vllm:kv_cache_usage_perc", -1.0)
            r.requests_tracked = m.get("cam_vllm:requests_tracked", -1.0)
            r.worker_stashed = m.get("cam_vllm:worker_requests_stashed", -1.0)
            r.full_cache_running = m.get("cam_vllm:requests_full_cache_running", -1.0)
            r.running_after = m.get("vllm:num_requests_running", -1.0)
            r.waiting_after = m.get("vllm:num_requests_waiting", -1.0)
            if not r.leaks or time.monotonic() > deadline:
                return

    async def run(self) -> StormReport:
        import httpx
        from tqdm import tqdm

        try:
            try:
                await self.resolve_model()
                self.report.probe_before = await self.probe()
                before = await self.metrics()
            except httpx.HTTPError as exc:
                raise CamVllmError(
                    f"load test: {self.base} does not answer ({type(exc).__name__}: {exc})"
                ) from exc
            rng = random.Random(self.config.seed)
            seeds = [rng.randrange(1 << 30) for _ in range(self.config.requests)]
            gate = asyncio.Semaphore(self.config.concurrency)
            start = time.monotonic()
            stop = asyncio.Event()
            sampler = asyncio.create_task(self.sample(stop))
            with tqdm(total=self.config.requests, desc="load test", disable=not self.progress) as bar:
                await asyncio.gather(*(self.one(i, random.Random(s), gate, bar) for i, s in enumerate(seeds)))
            stop.set()
            await sampler
            self.report.seconds = time.monotonic() - start
            try:
                after = await self.metrics()
                name = "vllm:num_preemptions_total"
                self.report.preemptions = int(after.get(name, 0.0) - before.get(name, 0.0))
                await self.settle()
                health = await self.client.get(f"{self.base}/health")
                self.report.healthy = health.status_code == 200
            except (httpx.HTTPError, CamVllmError) as exc:  # the server died or broke: a finding
                self.report.errors.append(f"after the storm: {type(exc).__name__}: {exc}")
        finally:
            await self.client.aclose()
        r = self.report
        r.latency_p50_s, r.latency_p99_s = _quantile(self.latencies, 0.5), _quantile(self.latencies, 0.99)
        r.ttft_p50_s, r.ttft_p99_s = _quantile(self.ttfts, 0.5), _quantile(self.ttfts, 0.99)
        return r


def run_storm(
    base_url: str, config: StormConfig, model: str | None = None, progress: bool = True
) -> StormReport:
    """Run the storm against ``base_url`` (e.g. ``http://127.0.0.1:8000``) and check for leaks."""
    return asyncio.run(_Storm(base_url, model, config, progress).run())


# --- CLI -----------------------------------------------------------------------------------------


def _range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(":")
    try:
        return int(lo), int(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO:HI (integers), got {text!r}") from None


def _arguments(parser: argparse.ArgumentParser) -> None:
    d = StormConfig()
    parser.add_argument(
        "--base-url", default="http://127.0.0.1:8000", help="the server (default: %(default)s)"
    )
    parser.add_argument("--model", default=None, help="model name (default: the server's first)")
    parser.add_argument(
        "--requests", type=int, default=d.requests, help="streaming completions (default: %(default)s)"
    )
    parser.add_argument(
        "--concurrency", type=int, default=d.concurrency, help="most in flight (default: %(default)s)"
    )
    parser.add_argument(
        "--abort-fraction",
        type=float,
        default=d.abort_fraction,
        help="share dropped by the client mid-stream",
    )
    parser.add_argument(
        "--full-cache-fraction",
        type=float,
        default=d.full_cache_fraction,
        help='share asking for the full cache (vllm_xargs {"kv_policy": "none"}; the server must allow it)',
    )
    parser.add_argument("--prompt-tokens", type=_range, default=d.prompt_tokens, metavar="LO:HI")
    parser.add_argument("--max-tokens", type=_range, default=d.max_tokens, metavar="LO:HI")
    parser.add_argument("--vocab", type=int, default=d.vocab, help="prompt token ids in [3, VOCAB)")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--out", default=None, help="also write the report as JSON here")
    parser.add_argument("--no-progress", action="store_true")


def _run(args: argparse.Namespace) -> int:
    import logging

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    config = StormConfig(
        requests=args.requests,
        concurrency=args.concurrency,
        abort_fraction=args.abort_fraction,
        full_cache_fraction=args.full_cache_fraction,
        prompt_tokens=args.prompt_tokens,
        max_tokens=args.max_tokens,
        vocab=args.vocab,
        seed=args.seed,
    )
    report = run_storm(args.base_url, config, args.model, progress=not args.no_progress)
    summary = json.dumps(report.summary(), indent=2)
    print(summary)
    if args.out:
        with open(args.out, "w") as f:
            f.write(summary + "\n")
    return 0 if report.ok else 1


register_subcommand(
    "load-test",
    "streaming completions with client aborts against a running server, then check it for leaks",
    _arguments,
    _run,
)
