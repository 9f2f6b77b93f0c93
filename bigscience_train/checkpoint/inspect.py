"""`bigscience ckpt inspect`: what a checkpoint holds, and how its config differs from a given one."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from bigscience_train.checkpoint.reader import model_tensors_metadata, read_meta, resolve_checkpoint


def flatten(node, prefix: str = "") -> dict[str, object]:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def config_diff(checkpoint_yaml: str, other) -> list[str]:
    saved = flatten(OmegaConf.to_container(OmegaConf.create(checkpoint_yaml), resolve=True))
    given = flatten(OmegaConf.to_container(other, resolve=True, enum_to_str=True))
    keys = sorted(set(saved) | set(given))
    return [
        f"  {k}: {saved.get(k, '<absent>')} -> {given.get(k, '<absent>')}"
        for k in keys
        if str(saved.get(k)) != str(given.get(k))
    ]


def describe(path: str | Path, compare_to=None) -> str:
    step_dir = resolve_checkpoint(path)
    meta = read_meta(step_dir)
    tensors = model_tensors_metadata(step_dir)
    dtypes = sorted({str(m.properties.dtype).removeprefix("torch.") for m in tensors.values()})
    layout = meta.get("layout", {})
    lines = [
        f"checkpoint {step_dir}",
        f"  step {meta['step']:,}  consumed samples {meta['consumed_samples']:,}  tokens {meta['consumed_tokens']:,}",
        f"  model {meta.get('model')}: {meta.get('parameters', 0):,} parameters in {len(tensors)} tensors ({', '.join(dtypes)})",
        f"  saved at tp={layout.get('tp')} pp={layout.get('pp')} dp={layout.get('dp')}, training dtype {meta.get('dtype')}, "
        f"version {meta.get('version')}, {meta.get('saved_at')}",
        f"  shards ({sum(meta['shards'].values()) / 1e6:,.1f} MB):",
        *(f"    {name:28s} {size / 1e6:10.2f} MB" for name, size in meta["shards"].items()),
    ]
    if compare_to is not None:
        diff = config_diff((step_dir / "config.yaml").read_text(), compare_to)
        lines += ["config differences (checkpoint -> given):", *diff] if diff else ["config: same as given"]
    return "\n".join(lines)
