#!/usr/bin/env python3
# The NVLink figure beside docs/distributed.md "Several GPUs": run on a 2-GPU machine as
#   python3 tools/nvlink_probe.py OUT.json   (torch with NCCL, every visible GPU; writes the commit
#   (DSV3_COMMIT or git), date and GPUs beside the figures; bench/results/nvlink_probe.json is its output)
# NVLink probe between two GPUs: NCCL all-to-all / all-reduce / send-recv bandwidth through torch.distributed.
import datetime, os, subprocess, sys, tempfile, time, json, torch, torch.distributed as dist, torch.multiprocessing as mp
def work(rank, world, path, out):
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method="file://" + path, rank=rank, world_size=world)
    res = {}
    for mb in (8, 64, 256):
        n = mb * 2**20
        x = torch.empty(n, dtype=torch.uint8, device="cuda"); y = torch.empty_like(x)
        for _ in range(3): dist.all_to_all_single(y, x)
        torch.cuda.synchronize(); t = time.perf_counter(); it = 10
        for _ in range(it): dist.all_to_all_single(y, x)
        torch.cuda.synchronize(); dt = (time.perf_counter() - t) / it
        # bytes that cross NVLink per rank: (world-1)/world of the buffer, each direction
        res[f"a2a_{mb}MiB_GBps_cross"] = n * (world - 1) / world / dt / 1e9
        f = torch.empty(n // 4, dtype=torch.float32, device="cuda")
        for _ in range(3): dist.all_reduce(f)
        torch.cuda.synchronize(); t = time.perf_counter()
        for _ in range(it): dist.all_reduce(f)
        torch.cuda.synchronize(); dt = (time.perf_counter() - t) / it
        res[f"allreduce_{mb}MiB_busbw_GBps"] = n * 2 * (world - 1) / world / dt / 1e9
    if rank == 0:
        commit = os.environ.get("DSV3_COMMIT") or subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip() or None
        res = {"bench": "nvlink_probe", "commit": commit,
               "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
               "gpus": [torch.cuda.get_device_name(i) for i in range(world)], "world": world, **res}
        json.dump(res, open(out, "w"), indent=1); print(json.dumps(res, indent=1))
    dist.destroy_process_group()
if __name__ == "__main__":
    out = sys.argv[1]; world = torch.cuda.device_count()
    if world < 2: sys.exit("nvlink_probe: needs at least 2 GPUs, found %d" % world)
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(work, args=(world, os.path.join(d, "init"), out), nprocs=world)
