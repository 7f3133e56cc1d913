import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Every model in the tests is tiny: one intra-op thread is faster than two, and far faster on busy cores.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --- restoration tests (test_restoration*.py, test_restore_recipe.py) ---
@pytest.fixture
def observation():
    """Factory ``observation(task, b=2, h=12, w=14, c=3, dtype=float32) -> (x, y)``: a random image x and its
    samples y = H x by the task's operator ("demosaic": Bayer RGGB, "sr2": ×2 decimation)."""
    from unrollattn.vision.sampling import build_operator

    def make(task, b=2, h=12, w=14, c=3, dtype=torch.float32):
        x = torch.rand(b, c, h, w, dtype=dtype)
        return x, build_operator(task)(x)

    return make


@pytest.fixture(scope="session")
def tiny_photos():
    """Four offline photos: test astronaut, chelsea (centre 32x32), train rocket, coffee."""
    from unrollattn.vision.photos import load_photos

    return load_photos(eval_crop=32, test_names=("astronaut", "chelsea"), train_names=("rocket", "coffee"))


# --- the Task.batch contract of every recipe ---
@pytest.fixture
def global_batch():
    """``global_batch(task, step, world_size)``: step ``step``'s micro-batches of ``task`` over ``world_size`` ranks
    and its ``loop.grad_accum`` accumulation steps, concatenated in chunk order (micro-major, then rank) per key."""
    from unrollattn.utils.dist import DistState

    def gather(task, step, world_size):
        parts = [task.batch(step, micro, DistState(rank=rank, world_size=world_size))
                 for micro in range(task.cfg.loop.grad_accum) for rank in range(world_size)]
        return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}

    return gather
