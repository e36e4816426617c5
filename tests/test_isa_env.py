"""CTP_FAST_ISA picks the instruction-set path at first use (checked in fresh interpreters)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import ctp_fast

from conftest import SUPPORTED_ISAS, error_scale, random_int4

pytestmark = pytest.mark.usefixtures("fixed_seed")

CHILD = textwrap.dedent("""
    import sys, torch, ctp_fast
    from ctp_fast import Int4Weight
    isa = ctp_fast.get_isa()
    data = torch.load(sys.argv[1], weights_only=True)
    w = Int4Weight.from_state_dict(data["w"])
    y = ctp_fast.int4_linear(data["x"], w, data["b"])
    y1 = ctp_fast.int4_linear(data["x"][:2], w, data["b"])  # small-M path
    gx = ctp_fast.int4_linear_grad_input(data["gy"], w)
    torch.save({"isa": isa, "y": y, "y1": y1, "gx": gx}, sys.argv[2])
    print("ISA", isa)
""")


# the child must import the very ctp_fast this process tests
PKG_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(ctp_fast.__file__)))


def run_child(tmp_path, env_value, code=CHILD, out="out.pt"):
    env = dict(os.environ)
    env.pop("CTP_FAST_ISA", None)
    env["OMP_NUM_THREADS"] = "1"  # see conftest.one_thread
    env["PYTHONPATH"] = os.pathsep.join([PKG_ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    if env_value is not None:
        env["CTP_FAST_ISA"] = env_value
    return subprocess.run([sys.executable, "-c", code, str(tmp_path / "in.pt"), str(tmp_path / out)],
                          env=env, cwd=PKG_ROOT, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Inputs saved for the children, and the default path's (no CTP_FAST_ISA) results, computed once."""
    tmp_path = tmp_path_factory.mktemp("isa_env")
    gen = torch.Generator().manual_seed(0)
    w = random_int4(200, 129, 32, symmetric=False, scale_dtype=torch.float16, act_order=True)
    data = {"w": w.state_dict(), "x": torch.randn(37, 129, generator=gen), "b": torch.randn(200, generator=gen),
            "gy": torch.randn(37, 200, generator=gen)}
    torch.save(data, tmp_path / "in.pt")
    r = run_child(tmp_path, None, out="default.pt")
    assert r.returncode == 0, r.stderr
    default = torch.load(tmp_path / "default.pt", weights_only=True)
    return tmp_path, w, data, default


def _check(out, w, data):
    W, E = w.unpack(torch.float64), error_scale(w)
    x, gy = data["x"].double(), data["gy"].double()
    # fp32 accumulation: 1e-5 relative to sum |x| (q + z)|s| (see test_int4_kernels.py)
    ref, mag = x @ W.T + data["b"].double(), x.abs() @ E.T + data["b"].double().abs()
    assert ((out["y"].double() - ref).abs() <= 1e-5 * mag).all()
    assert ((out["y1"].double() - ref[:2]).abs() <= 1e-5 * mag[:2]).all()
    assert ((out["gx"].double() - gy @ W).abs() <= 1e-5 * (gy.abs() @ E)).all()


def test_default_is_best_isa(inputs):
    _, w, data, default = inputs
    assert default["isa"] == SUPPORTED_ISAS[-1]  # no variable: the best ISA of this CPU
    _check(default, w, data)


@pytest.mark.parametrize("name", SUPPORTED_ISAS)
def test_env_selects_isa_and_results_match_default(inputs, name):
    tmp_path, w, data, default = inputs
    r = run_child(tmp_path, name, out=f"{name}.pt")
    assert r.returncode == 0, r.stderr
    forced = torch.load(tmp_path / f"{name}.pt", weights_only=True)
    assert forced["isa"] == name and f"ISA {name}" in r.stdout
    _check(forced, w, data)
    # equal to the default path within fp32 tolerance (both within 1e-5 of the reference)
    E = error_scale(w)
    mag_y = data["x"].double().abs() @ E.T + data["b"].double().abs()
    mag_g = data["gy"].double().abs() @ E
    assert ((forced["y"].double() - default["y"].double()).abs() <= 2e-5 * mag_y).all()
    assert ((forced["gx"].double() - default["gx"].double()).abs() <= 2e-5 * mag_g).all()


def test_env_empty_means_best(inputs):
    tmp_path = inputs[0]
    r = run_child(tmp_path, "", out="empty.pt")
    assert r.returncode == 0, r.stderr
    assert torch.load(tmp_path / "empty.pt", weights_only=True)["isa"] == SUPPORTED_ISAS[-1]


def test_env_bogus_fails_clearly_at_first_use(inputs):
    tmp_path = inputs[0]
    code = textwrap.dedent("""
        import torch, ctp_fast  # importing must not fail: the variable is read at first use
        from ctp_fast import Int4Weight
        w = Int4Weight.pack(torch.randn(8, 32), group_size=32)
        print("imported")
        try:
            ctp_fast.int4_linear(torch.randn(2, 32), w)
        except RuntimeError as e:
            print("first use:", str(e).splitlines()[0])
        else:
            print("first use: no error")
        try:
            ctp_fast.get_isa()
        except RuntimeError as e:
            print("get_isa:", str(e).splitlines()[0])
        ctp_fast.set_isa("scalar")  # an explicit choice still works afterwards
        print("after set_isa:", ctp_fast.get_isa(), tuple(ctp_fast.int4_linear(torch.randn(2, 32), w).shape))
    """)
    r = run_child(tmp_path, "bogus", code)
    assert r.returncode == 0, r.stderr
    msg = "CTP_FAST_ISA='bogus' is not an instruction set ctp_fast knows; expected one of scalar, avx2, avx512"
    assert "imported" in r.stdout
    assert f"first use: {msg}" in r.stdout, r.stdout
    assert f"get_isa: {msg}" in r.stdout, r.stdout
    assert "after set_isa: scalar (2, 8)" in r.stdout, r.stdout
    # and the plain child (no try/except) dies with that message
    r = run_child(tmp_path, "bogus")
    assert r.returncode != 0 and msg in r.stderr


@pytest.mark.skipif("avx512" in SUPPORTED_ISAS, reason="this CPU supports avx512")
def test_env_unsupported_isa(inputs):
    tmp_path = inputs[0]
    r = run_child(tmp_path, "avx512")
    assert r.returncode != 0
    assert "CTP_FAST_ISA='avx512' but this CPU does not support avx512" in r.stderr


def test_set_isa_overrides_for_this_process():
    prev = ctp_fast.get_isa()
    try:
        for name in SUPPORTED_ISAS:
            ctp_fast.set_isa(name)
            assert ctp_fast.get_isa() == name
    finally:
        ctp_fast.set_isa(prev)
