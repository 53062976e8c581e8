"""A malformed DeepSpeed layout is one clear error naming the file and the field, never an internal error.

Real ZeRO 1/2/3 checkpoints are trained here (examples/trainers/deepspeed_zero.py, 2 CPU/gloo ranks), then one
field of one pickle is rewritten (torch.load with weights_only=False, mutate, torch.save: fine in a test, with
the test's own files) to a wrong type, a negative or mismatched size, or nothing. finalize must exit 1 with one
line naming the file and the field, no traceback, no DEST, SRC unchanged; `inspect` must say the same. Every
case runs through the command line's main in this process; one also runs under torchrun. Marked `dist`.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from support import TIMEOUT_S, TRAINERS, check_ok, env, error_lines, finalize, no_traceback, torchrun, tree_digest

from distfinalize.cli import main

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # for the trainer, and for torch.load of DeepSpeed's own classes

pytestmark = pytest.mark.dist

VARIANTS = ("zero1-tied", "zero2-frozen", "zero3-frozen")
TAG = "global_step1"
MODEL12, MODEL3 = "mp_rank_00_model_states.pt", "zero_pp_rank_{}_mp_rank_00_model_states.pt"
OPTIM = "bf16_zero_pp_rank_{}_mp_rank_00_optim_states.pt"
OSD = "optimizer_state_dict"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ZeRO-1 (tied), ZeRO-2 and ZeRO-3 (with frozen parameters), one step each, one torchrun job on 2 ranks."""
    out = tmp_path_factory.mktemp("deepspeed-trust")
    check_ok(torchrun(2, TRAINERS / "deepspeed_zero.py", out, *[a for v in VARIANTS for a in ("--variant", v)]))
    return out


def first_shape(model: dict, value: object) -> None:
    group = model["param_shapes"][0]
    group[next(iter(group))] = value


def optim(edit: Callable[[dict], None]) -> Callable[[dict], None]:
    return lambda state: edit(state[OSD])


# (variant, file to rewrite, how, field the error must name)
# fmt: off
CASES = {
    "param_shapes is an int": ("zero2-frozen", MODEL12, lambda m: m.update(param_shapes=7), "param_shapes"),
    "a shape is an int": ("zero1-tied", MODEL12, lambda m: first_shape(m, 5), "param_shapes"),
    "a shape is negative": ("zero3-frozen", MODEL3.format(0), lambda m: first_shape(m, [-64, 64]), "param_shapes"),
    "a shape is a string": ("zero2-frozen", MODEL12, lambda m: first_shape(m, "64x64"), "param_shapes"),
    "param_shapes is missing": ("zero1-tied", MODEL12, lambda m: m.pop("param_shapes"), "param_shapes"),
    "one param group too many": ("zero2-frozen", MODEL12,
                                 lambda m: m["param_shapes"].append({"extra.weight": torch.Size([4])}),
                                 "single_partition_of_fp32_groups"),
    "buffer_names is an int": ("zero1-tied", MODEL12, lambda m: m.update(buffer_names=3), "buffer_names"),
    "module is a list": ("zero3-frozen", MODEL3.format(0), lambda m: m.update(module=[1, 2]), "module"),
    "shared_params is a list": ("zero1-tied", MODEL12, lambda m: m.update(shared_params=["lm_head.weight"]),
                                "shared_params"),
    "frozen_param_shapes is a list": ("zero2-frozen", MODEL12, lambda m: m.update(frozen_param_shapes=[1, 2]),
                                      "frozen_param_shapes"),
    "rank 1's frozen fragments are an int": ("zero3-frozen", MODEL3.format(1),
                                             lambda m: m.update(frozen_param_fragments=3),
                                             "frozen_param_fragments"),
    "parallel dims are an int": ("zero2-frozen", MODEL12, lambda m: m.update(checkpoint_parallel_dimensions=2),
                                 "checkpoint_parallel_dimensions"),
    "mp_world_size is a string": ("zero1-tied", MODEL12, lambda m: m.update(mp_world_size="1"), "mp_world_size"),
    "global_steps is negative": ("zero3-frozen", MODEL3.format(0), lambda m: m.update(global_steps=-1),
                                 "global_steps"),
    "partition_count holds a string": ("zero1-tied", OPTIM.format(0),
                                       optim(lambda o: o.update(partition_count=["two", 2])), "partition_count"),
    "partition_count is negative": ("zero3-frozen", OPTIM.format(1), optim(lambda o: o.update(partition_count=-2)),
                                    "partition_count"),
    "paddings are flat ints": ("zero2-frozen", OPTIM.format(1),
                               optim(lambda o: o.update(param_alignment_paddings=[0, 0])),
                               "param_alignment_paddings"),
    "a padding is negative": ("zero1-tied", OPTIM.format(0),
                              optim(lambda o: o["param_alignment_paddings"][0].__setitem__(0, -5)),
                              "param_alignment_paddings"),
    "a master partition is missing": ("zero2-frozen", OPTIM.format(1),
                                      optim(lambda o: o["single_partition_of_fp32_groups"].pop()),
                                      "single_partition_of_fp32_groups"),
    "a master partition is a float": ("zero3-frozen", OPTIM.format(0),
                                      optim(lambda o: o["fp32_flat_groups"].__setitem__(1, 0.5)),
                                      "flat partition 1"),
    "a rank's masters are float64": ("zero1-tied", OPTIM.format(1),
                                     optim(lambda o: o.update(single_partition_of_fp32_groups=[
                                         t.double() for t in o["single_partition_of_fp32_groups"]])),
                                     "mix dtypes"),
}
# fmt: on


# Where the error points when the broken field disagrees with another file: that file, or the tag folder.
ELSEWHERE = {"one param group too many": OPTIM.format(0), "a rank's masters are float64": ""}


def rewrite(path: Path, edit: Callable[[dict], None]) -> None:
    state = torch.load(path, map_location="cpu", weights_only=False)  # the test's own checkpoint
    edit(state)
    torch.save(state, path)


def broken_copy(trained: Path, tmp_path: Path, case: str) -> tuple[Path, str, str]:
    """A copy of the case's checkpoint with its one field rewritten: (the copy, the field, the file to name)."""
    variant, name, edit, field = CASES[case]
    src = tmp_path / "run"
    shutil.copytree(trained / variant, src)
    rewrite(src / TAG / name, edit)
    return src, field, f"{src / TAG / ELSEWHERE.get(case, name)}".rstrip("/")


def assert_one_clear_line(code: int, stderr: str, field: str, where: str) -> None:
    lines = error_lines(stderr)
    assert code == 1 and len(lines) == 1, f"exit {code}\n{stderr}"
    assert "internal error" not in lines[0] and field in lines[0] and where in lines[0], lines[0]


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """cli.main configures the `distfinalize` logger for a process; put it back for the other tests."""
    logger = logging.getLogger("distfinalize")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved


@pytest.mark.parametrize("case", CASES)
def test_malformed_layout_is_one_clear_error(
    trained: Path, tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    """Every case through the command line's main, in this process: finalize, then inspect."""
    src, field, where = broken_copy(trained, tmp_path, case)
    before = tree_digest(src)
    dest = tmp_path / "dest"
    for argv in ([str(src), str(dest)], ["inspect", str(src)]):
        code = main(argv)
        err = capsys.readouterr().err
        assert_one_clear_line(code, err, field, where)
        assert "Traceback" not in err, err
    assert not dest.exists() and not list(tmp_path.glob("dest*"))
    assert tree_digest(src) == before


def test_malformed_layout_under_torchrun(trained: Path, tmp_path: Path) -> None:
    """The same through real processes: a ZeRO-3 shape broken in rank 0's file, finalized by 2 ranks, inspected."""
    src, field, where = broken_copy(trained, tmp_path, "a shape is negative")
    before = tree_digest(src)
    dest = tmp_path / "dest"
    inspect = [sys.executable, "-m", "distfinalize", "inspect", str(src)]
    for result in (
        finalize(src, dest, nproc=2),
        subprocess.run(inspect, capture_output=True, text=True, env=env(), timeout=TIMEOUT_S, check=False),
    ):
        assert_one_clear_line(result.returncode, result.stderr, field, where)
        assert no_traceback(result), result.stderr
    assert not dest.exists() and tree_digest(src) == before


def test_the_unmodified_checkpoints_still_finalize(trained: Path, tmp_path: Path) -> None:
    """The checks refuse only what is malformed: every variant, as DeepSpeed saved it, finalizes."""
    for variant in VARIANTS:
        check_ok(finalize(trained / variant, tmp_path / variant))
        assert list((tmp_path / variant).glob("*.safetensors"))
