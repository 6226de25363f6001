"""Fleet benchmark (issue 14): prints, in one run,

(1) adapters per minute of `nlsr realign` fleet mode, sequential vs Ray on this machine's cores (target: Ray >= 1.7x
    on 2 cores), over a fleet of Llama-3-8B-shaped adapters (224 modules, rank 16 by default), same bytes checked,
    next to a plain forked process pool on the same fleet (a reference for what the cores allow, not an engine),
    where parallel adapters lose time: each phase's mean on a pool of one process and of all cores, and this
    machine's own ceiling: what the same pools give pure computation and pure memory copies, with no adapter;
(2) the per-adapter cost of fleet mode for Llama-3-8B-shaped adapters at rank 16 and 128 (resolve, hash, load,
    realign, save to a new folder: one `realign_one` call, as the engines run it) against the time to copy the same
    adapter files to a new folder (target <= 1.5x), with where the time goes.

The restorer is the paper's NLSR engine (`--preset paper`, the default here: low-rank throughout, so an adapter costs
its I/O, similarity, plan and patch); `--preset default` measures the project's default restorer, nlsr-addback,
at row granularity: its row masks come from the reference's dense update, once per fleet (the printed preparation),
and an adapter's similarity is taken on the factors.

Adapters and safety patches are random (bf16, written as stock PEFT folders; the patch's masks come from the `random`
scorer at the default config's granularity), so nothing is downloaded. Ray's start-up and a warm-up fleet (one task
per worker, paying the imports) are timed apart and not counted in (1); sequential mode gets the same warm-up.

Usage:
  .venv/bin/python benchmarks/fleet.py                        # full size (a quiet machine: ~10 GB free disk and RAM)
  .venv/bin/python benchmarks/fleet.py --layers 2 --fleet 4   # smoke size: checks the script runs, times mean nothing
  .venv/bin/python benchmarks/fleet.py --part 1 --workdir /dev/shm  # the disk out of the way (RAM: ~5 GB free)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import module_shapes, random_adapter

from nlsr_hub import NLSRConfig, NLSRPatcher, load_adapter, save_adapter
from nlsr_hub.adapters import LLAMA_TARGETS, LoraAdapter, LoraModule
from nlsr_hub.fleet import FleetSettings, realign_fleet
from nlsr_hub.fleet.driver import prepare_shared
from nlsr_hub.fleet.engines import torch_threads
from nlsr_hub.fleet.payload import ZeroCopy
from nlsr_hub.fleet.work import FleetShared, FleetTarget, files_sha256, realign_one
from nlsr_hub.safety_patch import build_safety_patch

BASE_ID = "meta-llama/Meta-Llama-3-8B"
_START = time.perf_counter()


def log(message: str) -> None:
    """A progress line on stderr (the figures go to stdout)."""
    print(f"[{time.perf_counter() - _START:7.1f} s] {message}", file=sys.stderr, flush=True)


def llama_adapter(rank: int, layers: int, seed: int, like: LoraAdapter | None = None) -> LoraAdapter:
    """A random bf16 LoRA with Llama-3-8B's module shapes (7 targets per block) and a stock PEFT config."""
    shapes = module_shapes(4096, 14336, 1024, layers)
    adapter = random_adapter(shapes, rank, seed, torch.bfloat16, like=like, drift=0.3)
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": sorted(LLAMA_TARGETS),
              "base_model_name_or_path": BASE_ID, "task_type": "CAUSAL_LM"}
    return LoraAdapter(modules=adapter.modules, config=config)


def write_patch(root: Path, rank: int, layers: int, config: NLSRConfig) -> Path:
    """A safety patch of a random aligned adapter (EXPO reference scale, `random` scorer masks), saved to `root`."""
    aligned = llama_adapter(rank, layers, seed=1)
    reference = LoraAdapter(modules={n: LoraModule(m.A, m.B, (1 + config.beta) * m.scale)
                                     for n, m in aligned.modules.items()}, config=aligned.config)
    metadata = {"scorer": "random", "sparsity_ratio": config.sparsity_ratio, "granularity": config.granularity,
                "beta": config.beta, "compat": False, "seed": 0, "calibration": {}, "inputs": {},
                "reference_source": "expo"}
    patch = build_safety_patch(reference, None, scorer="random", sparsity_ratio=config.sparsity_ratio,
                               granularity=config.granularity, seed=0, metadata=metadata)
    generator = torch.Generator().manual_seed(2)  # input-activation norms, as an activation scorer records them
    norms = {n: torch.rand(m.A.shape[1], generator=generator) for n, m in reference.modules.items()}
    return dataclasses.replace(patch, input_norms=norms).save_pretrained(root / f"patch-r{rank}")


def write_fleet(root: Path, count: int, rank: int, layers: int) -> list[str]:
    """`count` fine-tuned adapters (drifted from one random adapter) saved under `root`; their folders."""
    start = llama_adapter(rank, layers, seed=1)
    return [str(save_adapter(llama_adapter(rank, layers, seed=10 + i, like=start), root / f"adapter-{i:03d}"))
            for i in range(count)]


def load_shared(patch: Path, config: NLSRConfig) -> FleetShared:
    """The fleet's shared object as fleet mode makes it once per fleet: the saved patch loaded, hashed and prepared."""
    return prepare_shared(NLSRPatcher.from_pretrained(None, safety_patch=patch, config=config), progress=False)


def timed_fleet(patch: Path, specs: list[str], out: Path, engine: str, config: NLSRConfig,
                ray_num_cpus: float | None = None) -> float:
    """Seconds for one fleet run (every adapter realigned and written; resume off)."""
    patcher = NLSRPatcher.from_pretrained(None, safety_patch=patch, config=config)
    start = time.perf_counter()
    report = realign_fleet(patcher, specs, settings=FleetSettings(output_dir=out, resume=False), engine=engine,
                           ray_num_cpus=ray_num_cpus, progress=False)
    elapsed = time.perf_counter() - start
    failed = report.failed
    if failed:
        raise RuntimeError(f"{len(failed)} adapters failed, e.g. {failed[0]['error']}")
    return elapsed


_POOL_SHARED: dict[str, object] = {}  # the fleet's shared object, inherited by the forked pool workers


def _pool_one(job: tuple[int, str, str]) -> None:
    index, spec, out = job
    torch.set_num_threads(1)
    row = realign_one(FleetTarget(index, spec, Path(spec).name), _POOL_SHARED["shared"],
                      FleetSettings(output_dir=Path(out), resume=False))
    if row["status"] != "realigned":
        raise RuntimeError(row["error"])


def _pool_breakdown(job: tuple[int, str, str]) -> dict[str, float]:
    index, spec, out = job
    torch.set_num_threads(1)
    return breakdown(_POOL_SHARED["shared"], spec, Path(out) / f"{index:03d}")


def forked_map(fn: Callable[[Any], Any], workers: int, warm: list[Any], jobs: list[Any],
               before: Callable[[], Any] | None = None) -> tuple[list[Any], float]:
    """`fn` over `jobs` on a pool of `workers` forked processes (which inherit `_POOL_SHARED`), warmed with `warm`,
    the disk synced after the warm-up: the results, and the seconds from `before()` (timed, if given) to the end."""
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(workers) as pool:
        pool.map(fn, warm, chunksize=1)
        os.sync()
        start = time.perf_counter()
        if before is not None:
            before()
        results = pool.map(fn, jobs, chunksize=1)
        elapsed = time.perf_counter() - start
        pool.close()  # let the workers exit: a terminated fork of a Ray driver prints Ray's SIGTERM trace
        pool.join()
    return results, elapsed


def contention(patch: Path, specs: list[str], out: Path, config: NLSRConfig, cores: int) -> dict[int, dict[str, float]]:
    """Where parallel adapters lose time: the fleet's phases (hash, load, realign, save; means per adapter) on forked
    pools of one process and of `cores` processes, each after a warm-up, with the disk idle before each."""
    _POOL_SHARED["shared"] = load_shared(patch, config)
    phases = {}
    for workers in sorted({1, cores}):
        times, _ = forked_map(_pool_breakdown, workers, [(i, spec, str(out / "warm")) for i, spec in
                                                         enumerate(specs[:workers])],
                              [(i, spec, str(out / str(workers))) for i, spec in enumerate(specs)])
        phases[workers] = {key: statistics.mean(t[key] for t in times) for key in times[0]}
        shutil.rmtree(out)
    return phases


def _probe_compute(repeats: int) -> None:
    """Pure computation: float64 products of a 512 x 512 matrix (in cache), one torch thread."""
    torch.set_num_threads(1)
    a = torch.randn(512, 512, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for _ in range(repeats):
        a @ a


def _probe_memory(repeats: int) -> None:
    """Pure memory traffic: copies of a 64 MiB buffer (twice the L3 cache of most servers), as an adapter's
    conversions and copies stream its factors."""
    torch.set_num_threads(1)
    a = torch.ones(8 << 20, dtype=torch.float64)
    b = torch.empty_like(a)
    for _ in range(repeats):
        b.copy_(a)


PROBES = {"float64 matrix products": (_probe_compute, 150), "64 MiB memory copies": (_probe_memory, 60)}


def machine_ceiling(cores: int, rounds: int = 3) -> dict[str, list[float]]:
    """What this machine's cores give two kinds of pure work, with no adapter in it: the throughput of a forked pool
    of `cores` processes over one process, each running `cores` equal jobs (label -> the ratio of each round; the
    two pools alternate). The fleet's own ratio cannot be expected above these, least of all above the memory
    copies': an adapter's work is mostly streaming its factors through memory."""
    ratios: dict[str, list[float]] = {label: [] for label in PROBES}
    for _ in range(rounds):
        for label, (probe, repeats) in PROBES.items():
            jobs = [repeats] * cores
            _, one = forked_map(probe, 1, [1], jobs)
            _, many = forked_map(probe, cores, [1] * cores, jobs)
            ratios[label].append(one / many)
    return ratios


def timed_pool(patch: Path, specs: list[str], out: Path, config: NLSRConfig, workers: int) -> float:
    """Seconds for the same fleet on a plain `multiprocessing` pool of `workers` forked processes that inherit the
    prepared shared object: what this machine's cores allow without any engine's overhead (a reference, not an
    engine nlsr-hub offers). The pool is started and warmed before the timing; the timing counts a second loading
    and preparation of the patch, as the engines' lines pay it (the forked workers keep the first one, which they
    inherited when the pool started)."""
    _POOL_SHARED["shared"] = load_shared(patch, config)
    warm = [(i, spec, str(out.with_name(out.name + "-warm"))) for i, spec in enumerate(specs[:workers])]
    _, elapsed = forked_map(_pool_one, workers, warm, [(i, spec, str(out)) for i, spec in enumerate(specs)],
                            before=lambda: load_shared(patch, config))
    return elapsed


def same_results(left: Path, right: Path) -> bool:
    """Whether two fleet folders hold byte-identical results (summaries aside)."""
    def tree(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
                if p.is_file() and p.parent != root}
    return tree(left) == tree(right)


def _runners(patch: Path, specs: list[str], config: NLSRConfig, cores: int, fractions: list[float]
             ) -> dict[str, Callable[[Path], float]]:
    """The timed fleets of one round, by label: sequential, Ray at one CPU per task and at each fraction, the pool."""
    runners: dict[str, Callable[[Path], float]] = {
        "sequential": lambda out: timed_fleet(patch, specs, out, "sequential", config),
        "ray": lambda out: timed_fleet(patch, specs, out, "ray", config)}
    for cpus in fractions:
        runners[f"ray --ray-num-cpus {cpus:g}"] = (
            lambda out, cpus=cpus: timed_fleet(patch, specs, out, "ray", config, ray_num_cpus=cpus))
    runners["forked pool"] = lambda out: timed_pool(patch, specs, out, config, cores)
    return runners


def _fetch_seconds(refs: list[object]) -> float:
    """(A Ray task) seconds for this worker to fetch the object `refs[0]` from the object store."""
    import ray

    start = time.perf_counter()
    ray.get(refs[0])
    return time.perf_counter() - start


def time_shipping(ray: Any, shared: FleetShared, repeats: int = 3) -> dict[str, tuple[float, float]]:
    """Seconds to put the fleet's shared object in Ray's object store and for a (warm) worker to fetch it, pickled as
    it is (torch's own tensor pickling) and as fleet mode ships it (`ZeroCopy`), alternately: label -> medians of
    (put, fetch) over `repeats`."""
    fetch = ray.remote(_fetch_seconds)
    values = {"torch pickling": shared, "zero-copy buffers (fleet mode)": ZeroCopy(shared)}
    seconds: dict[str, list[tuple[float, float]]] = {label: [] for label in values}
    for _ in range(repeats):
        for label, value in values.items():
            start = time.perf_counter()
            ref = ray.put(value)
            put = time.perf_counter() - start
            seconds[label].append((put, ray.get(fetch.remote([ref]))))
            del ref
    return {label: (statistics.median(p for p, _ in runs), statistics.median(f for _, f in runs))
            for label, runs in seconds.items()}


def part_throughput(root: Path, args: argparse.Namespace) -> None:
    import ray

    cores, config = os.cpu_count() or 1, NLSRConfig.preset(args.preset)
    log(f"(1) writing a safety patch and {args.fleet} adapters")
    patch = write_patch(root, args.fleet_rank, args.layers, config)
    specs = write_fleet(root / "fleet", args.fleet, args.fleet_rank, args.layers)
    log("(1) warm-ups: sequential, then Ray (start and one task per worker)")
    timed_fleet(patch, specs[:1], root / "warm-seq", "sequential", config)  # imports and first-touch costs
    start = time.perf_counter()
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
    startup = time.perf_counter() - start
    runners = _runners(patch, specs, config, cores, args.ray_fractions)
    try:
        start = time.perf_counter()
        most = max([1.0] + [1 / f for f in args.ray_fractions])
        timed_fleet(patch, specs[:int(cores * most)], root / "warm-ray", "ray", config, ray_num_cpus=1 / most)
        warm = time.perf_counter() - start
        shipping = time_shipping(ray, load_shared(patch, config))
        seconds: dict[str, list[float]] = {label: [] for label in runners}
        same: dict[str, bool] = {}
        for round_ in range(args.rounds):  # side by side: each round runs every engine once, in a rotated order
            labels = list(runners)[round_ % len(runners):] + list(runners)[:round_ % len(runners)]
            outs = {label: root / f"out-{round_}-{i}" for i, label in enumerate(runners)}
            # round 1 runs sequential first: each other line is checked against it, then deleted (at most two
            # fleets' results on disk); every line starts with the disk idle (no writeback or discards pending)
            for label in labels:
                os.sync()
                seconds[label].append(runners[label](outs[label]))
                log(f"(1) round {round_ + 1}: {label} {seconds[label][-1]:.1f} s")
                if label != "sequential":
                    if round_ == 0:
                        same[label] = same_results(outs["sequential"], outs[label])
                    shutil.rmtree(outs[label])
            shutil.rmtree(outs["sequential"])
    finally:
        ray.shutdown()
    log("(1) where parallel adapters lose time: each phase on one process, then on all cores")
    phases = contention(patch, specs, root / "phases", config, cores)
    log("(1) this machine's ceiling: pure computation and pure memory copies, one process, then all cores")
    ceiling = machine_ceiling(cores)
    report_throughput(args, config, cores, seconds, same, startup=startup, warm=warm)
    for label, ratios in ceiling.items():
        print(f"    this machine's own ceiling, {label} (no adapter): a pool of {cores} processes does "
              f"{statistics.median(ratios):.2f}x the work of one [rounds: {' '.join(f'{r:.2f}' for r in ratios)}]")
    for label, (put, fetch) in shipping.items():
        print(f"    the fleet's patch through Ray's object store, {label}: ray.put {put:.2f} s, a warm worker's "
              f"fetch {fetch:.2f} s (medians of 3, alternating)")
    for workers, times in phases.items():
        detail = ", ".join(f"{key} {value:.3f} s" for key, value in times.items())
        print(f"    per adapter on a forked pool of {workers} process{'es' if workers > 1 else ''} (means, after a "
              f"warm-up): {detail}")


def report_throughput(args: argparse.Namespace, config: NLSRConfig, cores: int, seconds: dict[str, list[float]],
                      same: dict[str, bool], *, startup: float, warm: float) -> None:
    sequential = statistics.median(seconds["sequential"])
    print(f"(1) fleet of {args.fleet} Llama-3-8B-shaped adapters ({args.layers * 7} modules, rank {args.fleet_rank}, "
          f"bf16), restorer {config.restorer} (--preset {args.preset}), {cores} cores, one torch thread per adapter; "
          f"median of {args.rounds} rounds, each running every line once (Ray's start {startup:.1f} s and a warm-up "
          f"fleet {warm:.1f} s not counted)")
    for label, times in seconds.items():
        median = statistics.median(times)
        rounds = " ".join(f"{t:.1f}" for t in times)
        ratio = "" if label == "sequential" else (f" = {sequential / median:.2f}x sequential, same bytes: "
                                                 f"{same[label]}")
        note = (" (reference, not an engine: forked processes that inherit the prepared patch; its preparation is "
                "timed)") if label == "forked pool" else ""
        print(f"    {label:<26} {median:5.1f} s = {60 * args.fleet / median:5.1f} adapters/min{ratio} "
              f"[rounds: {rounds}]{note}")
    for label in (label for label in seconds if label.startswith("ray")):
        print(f"    speed-up of {label} over sequential: {sequential / statistics.median(seconds[label]):.2f}x "
              "(target >= 1.7x on 2 cores)")


def copy_seconds(folder: Path, target: Path, *, durable: bool = False) -> float:
    """Seconds to copy an adapter's files (config and weights) into a new folder; `durable` also fsyncs each file
    and the folder, as fleet mode writes its results (atomic and durable)."""
    shutil.rmtree(target, ignore_errors=True)
    start = time.perf_counter()
    target.mkdir(parents=True)
    for file in sorted(folder.iterdir()):
        shutil.copyfile(file, target / file.name)
        if durable:
            with open(target / file.name, "rb+") as handle:
                os.fsync(handle.fileno())
    if durable:
        fd = os.open(target, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return time.perf_counter() - start


def breakdown(shared: FleetShared, spec: str, out: Path) -> dict[str, float]:
    """Where one adapter's time goes: hash, load, realign (similarity, plan, patch) and save, against the fleet's
    shared patch as `realign_one` uses it (its reference norms already kept)."""
    patcher = NLSRPatcher(safety_patch=shared.patch, aligned=shared.aligned, config=shared.config,
                          inputs=shared.inputs)
    times = {}
    start = time.perf_counter()
    files_sha256(Path(spec))
    times["hash"], start = time.perf_counter() - start, time.perf_counter()
    adapter = load_adapter(spec)
    times["load"], start = time.perf_counter() - start, time.perf_counter()
    result = patcher.realign(finetuned=adapter, progress=False)
    times["realign"], start = time.perf_counter() - start, time.perf_counter()
    result.save_pretrained(out)
    times["save"] = time.perf_counter() - start
    return times


def part_cost(root: Path, args: argparse.Namespace) -> None:
    config = NLSRConfig.preset(args.preset)
    print(f"(2) per-adapter cost, Llama-3-8B-shaped ({args.layers * 7} modules, bf16), restorer {config.restorer}, "
          f"median of {args.repeats}, one torch thread:")
    for rank in args.ranks:
        log(f"(2) rank {rank}: writing a safety patch and an adapter")
        patch = write_patch(root, rank, args.layers, config)
        spec = write_fleet(root / f"cost-r{rank}", 1, rank, args.layers)[0]
        start = time.perf_counter()
        shared = load_shared(patch, config)
        prepared = time.perf_counter() - start
        settings = FleetSettings(output_dir=root / f"cost-out-r{rank}", resume=False)
        target = FleetTarget(index=0, spec=spec, name="adapter")
        copies, durable, costs, written = [], [], [], []
        with torch_threads(1):  # as the engines run an adapter
            realign_one(target, shared, settings)  # first touch
            for _ in range(args.repeats):
                copies.append(copy_seconds(Path(spec), root / f"copy-r{rank}"))
                durable.append(copy_seconds(Path(spec), root / f"copy-r{rank}", durable=True))
                shutil.rmtree(settings.output_dir / target.name)  # a new result, as each copy goes to a new folder
                start = time.perf_counter()
                row = realign_one(target, shared, settings)
                costs.append(time.perf_counter() - start)
                if row["error"]:
                    raise RuntimeError(row["error"])
                written.append(copy_seconds(settings.output_dir / target.name, root / f"copy-out-r{rank}",
                                            durable=True))
            parts = breakdown(shared, spec, root / f"breakdown-r{rank}")
        size = sum(f.stat().st_size for f in Path(spec).iterdir()) / 2**20
        copy, cost = statistics.median(copies), statistics.median(costs)
        detail = ", ".join(f"{k} {v:.2f} s" for k, v in parts.items())
        synced, output = statistics.median(durable), statistics.median(written)
        out_size = sum(f.stat().st_size for f in (settings.output_dir / target.name).iterdir()) / 2**20
        print(f"    rank {rank:>3} ({size:,.0f} MiB of adapter files): realign {cost:.2f} s vs copy {copy:.2f} s = "
              f"{cost / copy:.2f}x (target <= 1.5x); vs a durable copy (fsync, as results are written) {synced:.2f} s "
              f"= {cost / synced:.2f}x; vs a durable copy of the result's own files ({out_size:,.0f} MiB, the bytes "
              f"fleet mode must write) {output:.2f} s = {cost / output:.2f}x; {detail}; once per fleet, not per "
              f"adapter: loading and preparing the patch {prepared:.1f} s ({torch.get_num_threads()} torch threads)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("1", "2", "all"), default="all")
    parser.add_argument("--layers", type=int, default=32, help="Decoder blocks (32: Llama-3-8B, 224 modules).")
    parser.add_argument("--fleet", type=int, default=16, help="Adapters in the throughput fleet (default 16).")
    parser.add_argument("--fleet-rank", type=int, default=16, help="Rank of the throughput fleet's adapters.")
    parser.add_argument("--ranks", type=lambda s: [int(r) for r in s.split(",")], default=[16, 128],
                        help="Ranks for the per-adapter cost (default 16,128).")
    parser.add_argument("--repeats", type=int, default=3, help="Timed repeats per rank in (2).")
    parser.add_argument("--rounds", type=int, default=3, help="Rounds of (1), each timing every line once.")
    parser.add_argument("--ray-fractions", type=lambda s: [float(f) for f in s.split(",") if f], default=[],
                        help="Also time Ray at these CPUs per task (--ray-num-cpus), comma-separated, e.g. 0.5 "
                        "(default: none).")
    parser.add_argument("--preset", choices=("paper", "default"), default="paper",
                        help="paper (default here): the NLSR engine, low-rank throughout, whose per-adapter work is "
                        "I/O, similarity, plan and patch; default: nlsr-addback, which works on each module's dense "
                        "update.")
    parser.add_argument("--workdir", type=Path, default=None, help="Folder for the adapters (default: a temp dir).")
    args = parser.parse_args()
    import ray

    print(f"nlsr-hub fleet benchmark: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, ray {ray.__version__}, python {platform.python_version()}")
    with tempfile.TemporaryDirectory(prefix="nlsr-fleet-bench-", dir=args.workdir) as tmp:
        if args.part in ("1", "all"):
            part_throughput(Path(tmp), args)
        if args.part in ("2", "all"):
            part_cost(Path(tmp), args)


if __name__ == "__main__":
    main()
