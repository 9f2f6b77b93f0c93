import pytest

from bigscience_train.config import ConfigError, OverrideError, config_problems, load_config, validate
from bigscience_train.model.gpt import build_on_meta, count_parameters
from bigscience_train.parallel.dims import ParallelDims
from tests.conftest import run_cli


def problems(overrides, world_size=1):
    return config_problems(load_config(["train.iters=10", *overrides]), world_size)


def test_default_config_is_valid():
    validate(load_config(["train.iters=10"]), world_size=1)
    validate(load_config(["experiment=demo"]), world_size=2)


@pytest.mark.parametrize(
    "overrides, world, expected",
    [
        (
            ["model.hidden_size=100", "model.num_heads=3"],
            1,
            "model.hidden_size=100 is not divisible by model.num_heads=3",
        ),
        (["parallel.tp=3", "parallel.dp=1"], 3, "model.num_heads=4 is not divisible by parallel.tp=3"),
        (["parallel.pp=3", "parallel.dp=1"], 3, "model.num_layers=4 is not divisible by parallel.pp=3"),
        (
            ["parallel.pp=2", "parallel.virtual_stages=4", "parallel.pp_schedule=interleaved_1f1b"],
            2,
            "model.num_layers=4 is not divisible by parallel.pp=2 x parallel.virtual_stages=4",
        ),
        (
            ["parallel.pp=4", "parallel.pp_count_embeddings=true", "model.num_layers=4"],
            4,
            "(+2 for embedding and output, parallel.pp_count_embeddings) is not divisible by parallel.pp=4",
        ),
        (
            ["train.global_batch_size=10", "train.micro_batch_size=4"],
            1,
            "train.global_batch_size=10 is not divisible by train.micro_batch_size=4 x dp=1",
        ),
        (
            ["train.global_batch_size=8", "train.micro_batch_size=2"],
            3,
            "train.global_batch_size=8 is not divisible by train.micro_batch_size=2 x dp=3",
        ),
        (
            ["parallel.tp=2", "parallel.dp=2"],
            2,
            "world size 2 != parallel.tp=2 x parallel.pp=1 x parallel.dp=2",
        ),
        (["parallel.tp=2"], 3, "world size 3 is not divisible by parallel.tp=2 x parallel.pp=1"),
        (
            ["train.global_batch_size=16", "train.rampup_batch_size=[4,5,100]"],
            1,
            "train.global_batch_size=16 - start=4 is not divisible by the ramp-up increment=5",
        ),
        (
            ["train.global_batch_size=16", "train.micro_batch_size=2", "train.rampup_batch_size=[3,13,100]"],
            1,
            "train.rampup_batch_size start=3 is not divisible by micro batch x dp=2",
        ),
        (["train.rampup_batch_size=[4,4]"], 1, "must be [start, increment, ramp_samples]"),
        (["train.iters=null"], 1, "set train.iters or train.tokens"),
        (["parallel.virtual_stages=2", "parallel.pp=2"], 2, "needs parallel.pp_schedule=interleaved_1f1b"),
        (
            ["parallel.pp_schedule=zigzag"],
            1,
            "parallel.pp_schedule='zigzag' is not one of gpipe, 1f1b, interleaved_1f1b",
        ),
        (["parallel.sequence_parallel=true"], 1, "parallel.sequence_parallel=true needs parallel.tp > 1"),
        (
            ["parallel.sequence_parallel=true", "parallel.tp=2", "model.position=learned"],
            2,
            "sequence_parallel=true works with model.position=alibi or rotary, not learned",
        ),
        (
            [
                "parallel.pp=2",
                "train.global_batch_size=8",
                "train.micro_batch_size=2",
                "train.rampup_batch_size=[2,2,8]",
            ],
            2,
            "batch size 2 gives 1 micro-batches (micro batch x dp = 2): parallel.pp_schedule=1f1b needs at least "
            "parallel.pp=2",
        ),
        (
            [
                "parallel.pp=2",
                "parallel.pp_schedule=interleaved_1f1b",
                "parallel.virtual_stages=2",
                "train.global_batch_size=5",
            ],
            2,
            "parallel.pp_schedule=interleaved_1f1b needs a multiple of 2 (micro-batches // pp)",
        ),
        (["optim.min_lr=1.0", "optim.lr=0.1"], 1, "optim.min_lr=1.0 must be between 0 and optim.lr=0.1"),
        (["optim.decay_samples=10", "optim.decay_tokens=100"], 1, "at most one of optim.decay_samples"),
        (["data.blend=[0.3,a,b]"], 1, "data.blend has 3 entries"),
        (["data.blend=[x,a,0.5,b]"], 1, "data.blend[0]='x' is not a weight"),
        (["data.split='a,b'"], 1, "data.split='a,b' must be up to 3 non-negative numbers"),
        (
            ["model.position=rotary", "model.hidden_size=12", "model.num_heads=4"],
            1,
            "needs an even head size",
        ),
        (["train.resume=sometimes"], 1, "train.resume='sometimes' is not one of auto, never"),
    ],
)
def test_each_rule_names_its_fields(overrides, world, expected):
    found = problems(overrides, world)
    assert any(expected in p for p in found), found


def test_all_problems_reported_at_once():
    cfg = load_config(
        [
            "model.num_heads=3",
            "parallel.tp=2",
            "parallel.pp=3",
            "train.global_batch_size=7",
            "train.micro_batch_size=2",
        ]
    )
    with pytest.raises(ConfigError) as err:
        validate(cfg, world_size=4)
    text = str(err.value)
    for fragment in (
        "model.hidden_size=64 is not divisible by model.num_heads=3",
        "model.num_heads=3 is not divisible by parallel.tp=2",
        "model.num_layers=4 is not divisible by parallel.pp=3",
        "world size 4 is not divisible by parallel.tp=2 x parallel.pp=3",
        "train.global_batch_size=7 is not divisible",
        "set train.iters or train.tokens",
    ):
        assert fragment in text
    assert len(err.value.problems) >= 6


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("optim.lrr=1e-3", "Key 'lrr' not in 'OptimConfig'"),
        ("+optim.lrr=1e-3", "unknown config key: optim.lrr"),
        ("model.num_layers=many", "could not be converted to Integer"),
        ("model.position=sinusoidal", "Invalid value 'sinusoidal'"),
        ("model=gpt_3", "Could not find 'model/gpt_3'"),
    ],
)
def test_bad_overrides_are_errors(override, fragment):
    with pytest.raises(OverrideError) as err:
        load_config([override])
    assert fragment in str(err.value)


def test_presets_have_real_shapes():
    tr1 = load_config(["model=tr1_13b"]).model
    assert (tr1.num_layers, tr1.hidden_size, tr1.num_heads, tr1.seq_length) == (40, 5120, 32, 2048)
    bloom = load_config(["model=bloom_176b"]).model
    assert (bloom.num_layers, bloom.hidden_size, bloom.num_heads, bloom.vocab_size, bloom.seq_length) == (
        70,
        14336,
        112,
        250880,
        2048,
    )
    validate(
        load_config(
            [
                "model=bloom_176b",
                "parallel=bloom_176b",
                "train.iters=1",
                "train.global_batch_size=2048",
                "train.micro_batch_size=2",
            ]
        ),
        world_size=384,
    )


@pytest.mark.parametrize(
    "preset, billions",
    [("gpt_125m", 0.125), ("gpt_350m", 0.355), ("gpt_1b3", 1.31), ("tr1_13b", 12.9), ("bloom_176b", 176.2)],
)
def test_presets_build_on_meta_with_expected_size(preset, billions):
    model = build_on_meta(ParallelDims().model_shape(load_config([f"model={preset}"]).model))
    assert next(model.parameters()).device.type == "meta"
    assert count_parameters(model) / 1e9 == pytest.approx(billions, rel=0.03)


def test_cli_prints_resolved_config_and_reports_errors():
    out = run_cli(["train", "--cfg", "job", "model=gpt_350m", "optim.lr=2e-4"])
    assert out.returncode == 0, out.stderr
    assert "hidden_size: 1024" in out.stdout and "lr: 0.0002" in out.stdout
    bad = run_cli(["train", "optim.lrr=1"])
    assert bad.returncode == 2 and "Key 'lrr' not in 'OptimConfig'" in bad.stderr
    invalid = run_cli(["train", "train.iters=5", "model.num_heads=3", "data.tokenizer=/nonexistent.json"])
    assert invalid.returncode == 2
    assert (
        "model.num_heads=3" in invalid.stderr
        and "data.tokenizer: no such file /nonexistent.json" in invalid.stderr
    )


def test_a_user_config_directory_adds_presets_and_overrides_packaged_ones(tmp_path, monkeypatch):
    user = tmp_path / "my_configs"
    for group in ("model", "cluster", "experiment"):
        (user / group).mkdir(parents=True)
    (user / "model" / "my_model.yaml").write_text(
        "name: my_model\nnum_layers: 2\nhidden_size: 96\nnum_heads: 3\nseq_length: 32\nvocab_size: 512\n"
    )
    (user / "cluster" / "slurm.yaml").write_text(
        "name: slurm\ndevice: a100\nnodes: 4\nprocs_per_node: 8\naccount: my_project\npartition: gpu_p5\n"
    )
    (user / "experiment" / "mine.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /model: my_model\n  - override /cluster: slurm\n"
        "train:\n  iters: 7\n"
    )
    packaged_slurm = load_config(["cluster=slurm"]).cluster
    monkeypatch.setenv("BIGSCIENCE_CONFIG_DIR", str(user))

    cfg = load_config(["model=my_model", "cluster=slurm"])
    assert (cfg.model.name, cfg.model.hidden_size, cfg.model.num_layers) == ("my_model", 96, 2)
    assert (cfg.cluster.nodes, cfg.cluster.account, cfg.cluster.partition) == (4, "my_project", "gpu_p5")
    assert packaged_slurm.account != "my_project"
    mine = load_config(["experiment=mine"])
    assert (mine.model.name, mine.cluster.account, mine.train.iters) == ("my_model", "my_project", 7)
    # The packaged presets are still there, and a missing one is still named.
    assert load_config(["model=tr1_13b"]).model.hidden_size == 5120
    with pytest.raises(OverrideError, match="Could not find 'model/gpt_3'"):
        load_config(["model=gpt_3"])

    monkeypatch.setenv("BIGSCIENCE_CONFIG_DIR", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="BIGSCIENCE_CONFIG_DIR=.*missing is not a directory"):
        load_config([])
