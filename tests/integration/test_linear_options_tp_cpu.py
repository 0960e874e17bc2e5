"""The linear layers' options on 2 CPU ranks (gloo), the model with every option against the
one-process model:
- tensor parallel (`shard_linear_options`, then TorchTitan's llama3 plan, parallelize_hybrid's
  order): the same logits and gradients;
- a DCP checkpoint of the TP model loaded into a differently seeded TP model: the same logits;
- FSDP2 (fully_shard per block, as TorchTitan): the same logits and (summed) gradients.

Built in-process (two spawned ranks, no run_train.sh), so it costs seconds rather than the
three training runs of test_parallelisms_cpu.py."""

import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.integration

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, out_dir: str) -> None:
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor
        from torchtitan.models.llama3.infra.parallelize import apply_tp

        from titan_linear.models.hybrid.parallelize import shard_linear_options
        from tests.helpers import build
        from tests.models.test_linear_options import OPTIONS, tiny_args

        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=WORLD, init_method=f"tcp://127.0.0.1:{port}")
        mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("tp",))
        args = tiny_args(**OPTIONS["all"])

        def model():
            m = build(args, seed=0)
            with torch.no_grad():  # off the start values, so every option's gradient shows
                for name, p in m.named_parameters():
                    if any(s in name for s in ("log_scale", "log_decay", "out_norm", "short_conv")):
                        p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
            return m

        tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
        ref = model()
        expected = ref(tokens)
        # a fixed random weighting: every gradient is O(1), so the comparisons below are not vacuous
        probe = torch.randn(expected.shape, generator=torch.Generator().manual_seed(2))
        (expected * probe).sum().backward()

        tp = model()
        shard_linear_options(tp, mesh)
        apply_tp(tp, mesh, loss_parallel=False, enable_float8_tensorwise_tp=False, cp_enabled=False)
        assert isinstance(tp.layers["0"].attention.short_conv.q_weight, DTensor)
        assert tp.layers["0"].attention.q_log_scale.to_local().shape == (2,)
        assert tp.layers["0"].attention.k_log_decay.to_local().shape == (1,)  # 2 kv heads over 2 ranks
        got = tp(tokens)
        got = got.full_tensor() if isinstance(got, DTensor) else got
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        (got * probe).sum().backward()
        ref_params = dict(ref.named_parameters())
        for name, p in tp.named_parameters():
            if ".attention." in name and name.startswith(("layers.0", "layers.2")):
                grad = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
                want = ref_params[name].grad
                torch.testing.assert_close(grad, want, rtol=1e-4, atol=1e-5 * want.abs().max().item(), msg=name)

        import torch.distributed.checkpoint as dcp
        from torch.distributed.fsdp import fully_shard

        dcp.save(tp.state_dict(), checkpoint_id=f"{out_dir}/dcp")
        other = build(args, seed=5)
        shard_linear_options(other, mesh)
        apply_tp(other, mesh, loss_parallel=False, enable_float8_tensorwise_tp=False, cp_enabled=False)
        state = other.state_dict()
        dcp.load(state, checkpoint_id=f"{out_dir}/dcp")
        other.load_state_dict(state)
        loaded = other(tokens)
        loaded = loaded.full_tensor() if isinstance(loaded, DTensor) else loaded
        torch.testing.assert_close(loaded, expected, rtol=1e-5, atol=1e-5)

        fsdp = model()
        for block in fsdp.layers.values():
            fully_shard(block, mesh=mesh)
        fully_shard(fsdp, mesh=mesh)
        got = fsdp(tokens)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        (got * probe).sum().backward()  # both ranks see the same batch: the mean gradient is the reference
        for name, p in fsdp.named_parameters():
            if ".attention." in name and name.startswith(("layers.0", "layers.2")):
                want = ref_params[name].grad
                torch.testing.assert_close(p.grad.full_tensor(), want, rtol=1e-4,
                                           atol=1e-5 * want.abs().max().item(), msg=name)
        # initialising a sharded parameter (TP or FSDP) writes each rank's part of the per-head values
        from titan_linear.models.hybrid.linear_options import fill, initial_log_decay

        for sharded in (tp, fsdp):
            p = sharded.layers["0"].attention.k_log_decay
            fill(p, initial_log_decay(2))
            torch.testing.assert_close(p.full_tensor(), initial_log_decay(2))
        if rank == 0:
            open(f"{out_dir}/ok", "w").write("ok")
    except BaseException:
        open(f"{out_dir}/error{rank}", "w").write(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_tp2_dcp_fsdp2_all_options_match_one_process(tmp_path):
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, str(tmp_path))) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        if p.is_alive():
            p.kill()
    errors = [f.read_text() for f in sorted(tmp_path.glob("error*"))]
    assert not errors, errors[0]
    assert (tmp_path / "ok").is_file()
