"""Adding a mechanism is one module and one row of the mechanism table: a toy mechanism written here
(its config, plug-in and presets, what its module would hold) and added to the table as one row is
built into runs in its level's place, has presets, can be calibrated, gets a generated accelerator
node, and reports through RunStats and the report's signal plots, with nothing else edited."""
from dataclasses import dataclass

import pytest
import torch

from accel_fixtures import EDM_, F, V, grid_inputs, random_net, sample
from conftest import import_pack_nodes
from turbo_core.accel import mechanisms
from turbo_core.accel.base import Accelerator
from turbo_core.accel.config import MechanismConfig
from turbo_core.accel.mechanisms import Mechanism, Node, Setting, SignalPlot
from turbo_core.diffusion import karras_sigmas


# --- what the toy's module would hold ---------------------------------------------------------
@dataclass(frozen=True)
class ToyConfig(MechanismConfig):
    every: int = 2              # every n-th call, each block's chain is answered with its last residual
    start_percent: float = 0.0
    end_percent: float = 1.0
    storage: str = "native"

    def validate(self) -> None:
        if int(self.every) < 2:
            raise ValueError(f"ToyConfig.every must be >= 2, got {self.every}")


class _ToyState:
    def __init__(self):
        self.residual: dict = {}

    def reset(self) -> None:
        self.residual.clear()

    def nbytes(self) -> int:
        return sum(r.numel() * r.element_size() for r in self.residual.values())


class ToyReuse(Accelerator):
    name = "toy"
    state_class = _ToyState

    def __init__(self, config=None):
        super().__init__()
        self.config = ToyConfig.from_dict(config)

    def chain(self, dispatch, block, x, nxt):
        st, step = self.state(dispatch), dispatch.step
        r = st.residual.get(block)
        if r is not None and step.index % self.config.every == 0:
            dispatch.stats.signal(f"toy.b{block}", 0.5, 1.0)
            dispatch.stats.chain_bypassed(block)
            return x + r
        x_in = x.clone()
        y = nxt(x)
        st.residual[block] = (y - x_in).detach()
        return y


PRESETS = {"off": None, "quality": ToyConfig(every=8), "balanced": ToyConfig(every=4), "fast": ToyConfig(every=2)}

# --- the one row --------------------------------------------------------------------------------
TOY = Mechanism("toy", "chain", ToyConfig, ToyReuse, PRESETS,
                Node("Turbo4DToy", "Toy Reuse", "A toy: every n-th call reuses each block's last residual."),
                settings=(Setting("every", 2, 16, "custom only: reuse on every n-th call."),),
                calibrate="every", plot=SignalPlot("toy: a constant", (20, 20, 200)))


@pytest.fixture
def with_toy(monkeypatch):
    monkeypatch.setattr(mechanisms, "MECHANISMS", mechanisms.MECHANISMS + (TOY,))


@pytest.fixture(scope="module")
def net():
    return random_net()


def test_the_row_composes_at_its_level_and_has_presets(with_toy):
    from turbo_core.accel.calibrate import calibrated
    from turbo_core.accel.presets import apply_preset, preset_config, turbo4d_specs
    from turbo_core.accel.registry import build_run

    run = build_run([("prune", None), ("toy", {"every": 3}), ("cache", None), ("step", None)])
    assert [a.name for a in run.accelerators] == ["step", "toy", "cache", "prune"]  # step, chain, block, token
    assert run.accelerators[1].config == ToyConfig(every=3)
    assert preset_config("toy", "fast") == ToyConfig(every=2)
    assert apply_preset([("cache", None)], "toy", "balanced") == [("cache", None), ("toy", ToyConfig(every=4))]
    assert "toy" not in [n for n, _ in turbo4d_specs("fast", [("toy", None)])]  # a table mechanism
    assert "toy" in calibrated()
    with pytest.raises(ValueError, match="ToyConfig.every must be >= 2"):
        build_run([("toy", {"every": 1})])


def test_the_row_can_be_calibrated(with_toy, net):
    from turbo_core.accel.calibrate import calibrate

    noise, cond, cam = grid_inputs(net)
    cal = calibrate(net, EDM_, [{"noise": noise, "cond": cond, "camera": cam}], karras_sigmas(6), V, F,
                    mechanism="toy", candidates=[8, 2], target_psnr=0.0)
    assert cal.field == "every" and cal.value == 2
    assert cal.specs() == [("toy", ToyConfig(every=2))]


def test_the_row_reports_through_the_stats_and_the_report(with_toy, net):
    from turbo_core.run_report import draw_signals, run_payload

    x, st = sample(net, [("toy", ToyConfig(every=3))])
    assert torch.isfinite(x).all()
    assert st.chains_bypassed == 3 * net.cfg.depth  # calls 3, 6, 9 of 12
    assert st.configs == {"toy": ToyConfig(every=3).to_dict()}
    payload = run_payload(st)
    assert payload["accelerators"] == {"toy": ToyConfig(every=3).to_dict()}
    assert sum("toy" in s for s in payload["signals"]) == 3
    assert draw_signals(payload["signals"]).shape[0] == 120  # the toy's own panel


def test_the_row_gets_a_generated_node(monkeypatch):
    # The pack is imported before the toy joins the table: its NODES, built at import and cached for
    # the process, stay the shipped ones for the tests that follow (a golden test lists them).
    pack = import_pack_nodes()
    acc, glue = pack("accelerators"), pack("model")
    monkeypatch.setattr(mechanisms, "MECHANISMS", mechanisms.MECHANISMS + (TOY,))
    node, members = next((n, ms) for n, ms in mechanisms.nodes() if n.node_id == "Turbo4DToy")
    cls = acc.accelerator_node(node, members)
    info = cls.GET_NODE_INFO_V1()
    assert info["display_name"] == "Toy Reuse" and info["category"] == "Turbo4D/accelerate"
    assert list(info["input"]["required"]) == ["model", "preset", "every", "start_percent", "end_percent", "storage"]
    assert info["input"]["required"]["every"][1]["default"] == 2
    model = glue.make_model_patcher(random_net(), torch.float32)
    out, line = cls.execute(model=model, preset="custom", every=5, start_percent=0.0, end_percent=1.0,
                            storage="fp16").result
    assert glue.accelerator_specs(out) == [("toy", ToyConfig(every=5, storage="fp16"))]
    assert line.startswith('Toy Reuse: custom {"end_percent": 1.0, "every": 5')
    off, line = cls.execute(model=out, preset="off", every=5, start_percent=0.0, end_percent=1.0,
                            storage="native").result
    assert glue.accelerator_specs(off) == [] and line == "Toy Reuse: off"


def test_chain_bypass_node_takes_calibrations_of_its_two_mechanisms(tmp_path, request):
    """The Chain Bypass node sets the step skip and the per-block bypass. A calibration of either
    applies; one written before the two were split (mechanism "bypass", the settings of both in one
    config) still applies to both, with the settings line it had; another node's is refused."""
    import json

    from turbo_core.accel.bypass import ChainBypassConfig
    from turbo_core.accel.calibrate import Calibration, save_calibration
    from turbo_core.accel.step_skip import StepSkipConfig

    pack = import_pack_nodes()
    acc, glue = pack("accelerators"), pack("model")
    model = glue.make_model_patcher(random_net(), torch.float32)
    both = {"threshold": 0.0, "start_percent": 0.0, "end_percent": 1.0, "max_consecutive": 2, "storage": "native",
            "signal_stride": 8, "step_threshold": 0.1, "step_max_skips": 10000, "forecast_order": 0, "kappa_prior": 0.19}
    files = {"before_the_split": Calibration("bypass", "step_threshold", 0.1, 35.0, both),
             "step": Calibration("step", "step_threshold", 0.05, 35.0, StepSkipConfig(step_threshold=0.05).to_dict()),
             "bypass": Calibration("bypass", "threshold", 0.04, 40.0, ChainBypassConfig(threshold=0.04).to_dict()),
             "cache": Calibration("cache", "threshold", 0.2, 35.0, {"threshold": 0.2})}
    for name, cal in files.items():
        save_calibration(cal, str(tmp_path / f"{name}.json"))

    # Calibration files are read by name from their folder only (nodes/files.py): this test's
    # folder joins it for the test.
    import folder_paths

    acc.register_calibration_folder()
    paths, exts = folder_paths.folder_names_and_paths[acc.CALIBRATION_FOLDER]
    folder_paths.folder_names_and_paths[acc.CALIBRATION_FOLDER] = (list(paths) + [str(tmp_path)], exts)
    request.addfinalizer(lambda: folder_paths.folder_names_and_paths.__setitem__(acc.CALIBRATION_FOLDER,
                                                                                 (paths, exts)))

    def run(name):
        return acc.ChainBypass.execute(model=model, preset="balanced", threshold=0.08, max_consecutive=2,
                                       step_threshold=0.0, step_max_skips=3, kappa_prior=0.0, start_percent=0.2,
                                       end_percent=0.95, storage="native",
                                       calibration_file=f"{name}.json").result

    out, line = run("before_the_split")
    assert dict(glue.accelerator_specs(out)) == {
        "bypass": ChainBypassConfig(threshold=0.0, start_percent=0.0, end_percent=1.0),
        "step": StepSkipConfig(step_threshold=0.1, step_max_skips=10000, kappa_prior=0.19, start_percent=0.0,
                               end_percent=1.0)}
    assert line == f"Chain Bypass: custom {json.dumps(both, sort_keys=True)}"
    assert glue.accelerator_specs(run("step")[0]) == [("step", StepSkipConfig(step_threshold=0.05))]
    assert glue.accelerator_specs(run("bypass")[0]) == [("bypass", ChainBypassConfig(threshold=0.04))]
    with pytest.raises(ValueError, match="calibrates 'cache', not Chain Bypass"):
        run("cache")
