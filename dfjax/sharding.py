"""Meshes and shardings: one config from a single device to many GPUs and multi-host TPU pods.

The mesh has two axes. `tensor` splits the DiT's attention heads (q/k/v columns, o rows, the q/k
norm weights, the cross-attention text K/V) and FFN columns; every KV cache, the baseline's and
each Dummy Forcing head group's, is split along its heads, so a device holds only its heads'
caches. `data` runs several videos at once, in one of two modes:

  "replicas" (default): each data index is an independent group of `tensor` devices with its own
      jobs (its own prompts and seeds); groups never talk to each other and a process drives the
      groups whose devices are its own (`MeshConfig.local_groups`). Any attention kernel works
      when tensor == 1, since a group of one device is not partitioned at all.
  "batch": one program over the whole mesh with the batch of a Generator split over `data`.

Which array dimension goes to which mesh axis is decided in one place: every parameter, cache
and activation dimension has a logical name (PARAM_AXES, CACHE_AXES, ...) and a rules table maps
logical names to mesh axes. A rules table that sends two dimensions of one array to the same
mesh axis, or names an axis the mesh lacks, is refused.

Dummy Forcing: a plan whose per-layer cache groups are not multiples of the tensor size cannot be
split evenly; dfjax.dummy.mesh rounds it, and a Generator on a mesh does so itself.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dfjax.cache import AttentionLayout, init_cache
from dfjax.kernels import attention as kernels

AXES = ("data", "tensor")
DATA_MODES = ("replicas", "batch")

# ------------------------------------------------------------------------------------------------ rules

# Logical dimension name -> mesh axes (a tuple; empty = not split). Every logical name used in this
# file must be here: an unknown name is an error, not silently replicated.
DEFAULT_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("batch", ("data",)),
    ("heads", ("tensor",)),  # attention heads: q/k/v columns, o rows, norm_q/norm_k, KV caches, text K/V
    ("mlp", ("tensor",)),  # FFN hidden columns
    ("embed", ()),  # the residual width
    ("embed_in", ()),  # input widths of the embeddings (patch, text, frequency)
    ("embed_out", ()),  # output widths of the head and the time projection
    ("modulation", ()),  # the 6 (or 2) rows of the modulation tables
    ("kv_tokens", ()),  # cache slots
    ("text_tokens", ()),
    ("head_dim", ()),
    ("frames", ()),
    ("height", ()),
    ("width", ()),
    ("channels", ()),
)


def _as_axes(v) -> tuple[str, ...]:
    if v is None:
        return ()
    if isinstance(v, str):
        return (v,)
    return tuple(v)


@dataclass(frozen=True)
class Rules:
    """A logical -> mesh axes table. Hashable; built from pairs or a dict (JSON values: null, "axis", [..])."""

    table: tuple[tuple[str, tuple[str, ...]], ...] = DEFAULT_RULES

    def __post_init__(self):
        pairs = tuple(self.table.items()) if isinstance(self.table, Mapping) else tuple(self.table)
        pairs = tuple((str(k), _as_axes(v)) for k, v in pairs)
        names = [k for k, _ in pairs]
        dup = sorted({k for k in names if names.count(k) > 1})
        if dup:
            raise ValueError(f"sharding rules name {dup} more than once; give each logical axis one rule.")
        for k, axes in pairs:
            if len(set(axes)) != len(axes):
                raise ValueError(f"sharding rule {k!r} -> {axes} repeats a mesh axis.")
        object.__setattr__(self, "table", pairs)

    def with_overrides(self, overrides: Mapping[str, Any] | None) -> "Rules":
        """This table with some logical names remapped (unknown names are refused: a typo must not pass)."""
        if not overrides:
            return self
        d = dict(self.table)
        unknown = sorted(set(overrides) - set(d))
        if unknown:
            raise ValueError(f"sharding rules: unknown logical axis name(s) {unknown}; known: {sorted(d)}.")
        d.update({k: _as_axes(v) for k, v in overrides.items()})
        return Rules(tuple(d.items()))

    def mesh_axes(self, name: str | None) -> tuple[str, ...]:
        if name is None:
            return ()
        for k, axes in self.table:
            if k == name:
                return axes
        raise ValueError(f"no sharding rule for logical axis {name!r}; add it to the rules table.")

    def spec(self, logical: tuple[str | None, ...], mesh_axis_names=AXES) -> PartitionSpec:
        """The PartitionSpec of an array whose dimensions have these logical names."""
        used: dict[str, str] = {}
        parts = []
        for name in logical:
            axes = self.mesh_axes(name)
            for a in axes:
                if a not in mesh_axis_names:
                    raise ValueError(f"sharding rule {name!r} -> {a!r}: the mesh has no axis {a!r} "
                                     f"(its axes: {tuple(mesh_axis_names)}).")
                if a in used:
                    raise ValueError(f"sharding rules map both {used[a]!r} and {name!r} of one array {logical} to "
                                     f"mesh axis {a!r}; an axis can split only one dimension.")
                used[a] = name
            parts.append(None if not axes else axes[0] if len(axes) == 1 else axes)
        return PartitionSpec(*parts)


def named_sharding(mesh: Mesh, rules: Rules, logical: tuple[str | None, ...], shape=None, what: str = "array"
                   ) -> NamedSharding:
    """NamedSharding from logical names; with `shape`, checks that every split dimension divides evenly."""
    spec = rules.spec(logical, mesh.axis_names)
    if shape is not None:
        if len(shape) != len(logical):
            raise ValueError(f"{what}: shape {tuple(shape)} has {len(shape)} dims, logical axes {logical} name "
                             f"{len(logical)}.")
        for size, name, part in zip(shape, logical, spec):
            n = _axis_size(mesh, part)
            if size % n:
                raise ValueError(f"{what}: dimension {name!r} of size {size} does not split over mesh axes {part} "
                                 f"of size {n}; choose a mesh whose {part} size divides {size}.")
    return NamedSharding(mesh, spec)


def _axis_size(mesh: Mesh, part) -> int:
    if part is None:
        return 1
    names = (part,) if isinstance(part, str) else part
    return int(np.prod([mesh.shape[a] for a in names]))


# ------------------------------------------------------------------------------------------------ logical axes

# Logical axes of every WanDiT parameter, by flat key (dfjax.params.path_key). A key no pattern
# matches is an error: a new parameter must get a decision here.
_ATTN = r"blocks\.\d+\.(self_attn|cross_attn)\."
PARAM_AXES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (_ATTN + r"(q|k|v)\.kernel", ("embed", "heads")),
    (_ATTN + r"(q|k|v)\.kernel_t", ("heads", "embed")),  # fp8's kernels are stored transposed, [dout, din]
    (_ATTN + r"(q|k|v)\.(bias|scale)", ("heads",)),  # scale: fp8's per-output-channel weight scale
    (_ATTN + r"norm_(q|k)", ("heads",)),  # RMSNorm over the full width: GSPMD adds the all-reduce of the mean
    (_ATTN + r"o\.kernel", ("heads", "embed")),
    (_ATTN + r"o\.kernel_t", ("embed", "heads")),
    (_ATTN + r"o\.(bias|scale)", ("embed",)),  # fp8: a split input's per-token amax is all-reduced (o, ffn_out)
    (r"blocks\.\d+\.ffn_in\.kernel", ("embed", "mlp")),
    (r"blocks\.\d+\.ffn_in\.kernel_t", ("mlp", "embed")),
    (r"blocks\.\d+\.ffn_in\.(bias|scale)", ("mlp",)),
    (r"blocks\.\d+\.ffn_out\.kernel", ("mlp", "embed")),
    (r"blocks\.\d+\.ffn_out\.kernel_t", ("embed", "mlp")),
    (r"blocks\.\d+\.ffn_out\.(bias|scale)", ("embed",)),
    (r"blocks\.\d+\.modulation", ("modulation", "embed")),
    (r"blocks\.\d+\.norm3_(weight|bias)", ("embed",)),
    (r"(patch_embedding|text_embedding_1|time_embedding_1)\.kernel", ("embed_in", "embed")),
    (r"(text_embedding_2|time_embedding_2)\.kernel", ("embed", "embed")),  # replicated: both names map to ()
    (r"(patch_embedding|text_embedding_1|text_embedding_2|time_embedding_1|time_embedding_2)\.bias", ("embed",)),
    (r"(time_projection|head)\.kernel", ("embed", "embed_out")),
    (r"(time_projection|head)\.bias", ("embed_out",)),
    (r"head_modulation", ("modulation", "embed")),
)
_PARAM_PATTERNS = tuple((re.compile(p + r"$"), axes) for p, axes in PARAM_AXES)

CACHE_AXES = ("batch", "kv_tokens", "heads", "head_dim")  # one K or V buffer of a head group
TEXT_KV_AXES = ("batch", "text_tokens", "heads", "head_dim")  # cross-attention K or V of one layer
CONTEXT_AXES = ("batch", "text_tokens", "embed_in")  # text encoder output
LATENT_AXES = ("batch", "frames", "height", "width", "channels")


def param_logical_axes(key: str) -> tuple[str | None, ...]:
    for pattern, axes in _PARAM_PATTERNS:
        if pattern.match(key):
            return axes
    raise ValueError(f"parameter {key!r} has no logical axes in dfjax.sharding.PARAM_AXES; add a rule for it.")


def _flat_key(path) -> str:
    """A jax tree path of an nnx.State leaf -> the flat parameter key ("blocks.0.self_attn.q.kernel")."""
    parts = []
    for p in path:
        name = getattr(p, "key", getattr(p, "name", getattr(p, "idx", None)))
        parts.append(str(name))
    if parts and parts[-1] in ("value", "raw_value"):
        parts.pop()
    return ".".join(parts)


def param_shardings(params, mesh: Mesh, rules: Rules = Rules()):
    """A pytree like `params` (an nnx.State, or a flat {key: array or ShapeDtypeStruct} dict) of NamedShardings."""
    if type(params) is dict:  # a flat dict (dfjax.params); an nnx.State is a pytree of Variables
        return {k: named_sharding(mesh, rules, param_logical_axes(k), v.shape, k) for k, v in params.items()}
    return jax.tree_util.tree_map_with_path(
        lambda path, x: named_sharding(mesh, rules, param_logical_axes(_flat_key(path)), x.shape, _flat_key(path)),
        params)


def cache_shardings(layout: AttentionLayout, batch: int, head_dim: int, mesh: Mesh, rules: Rules = Rules()):
    """A KVCache of NamedShardings for the cache layout (dfjax.cache.init_cache's tree): every buffer split along
    its heads."""
    abstract = jax.eval_shape(lambda: init_cache(layout, batch, head_dim, jnp.float32))
    return jax.tree.map(lambda a: named_sharding(mesh, rules, CACHE_AXES, a.shape,
                                                 f"a KV cache group of {a.shape[2]} heads"), abstract)


def text_kv_shardings(cfg, batch: int, mesh: Mesh, rules: Rules = Rules()):
    s = named_sharding(mesh, rules, TEXT_KV_AXES, (batch, cfg.text_len, cfg.num_heads, cfg.head_dim), "text K/V")
    return tuple((s, s) for _ in range(cfg.num_layers))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


# ------------------------------------------------------------------------------------------------ mesh config

@dataclass(frozen=True)
class MeshConfig:
    """How many devices work together (tensor) and how many groups work side by side (data).

    data = -1: as many groups as the devices allow (fewer: the first ones, in process order). Tensor
    groups never span processes (hosts):
    their traffic is every layer's all-reduce, which belongs on NVLink / ICI, not between hosts.
    rules: overrides of DEFAULT_RULES, e.g. {"mlp": null} to keep the FFN whole.
    """

    data: int = -1
    tensor: int = 1
    data_mode: str = "replicas"
    rules: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self):
        if isinstance(self.rules, Mapping):
            object.__setattr__(self, "rules", tuple((k, tuple(v) if isinstance(v, list) else v)
                                                    for k, v in self.rules.items()))
        if self.tensor < 1:
            raise ValueError(f"mesh tensor size must be >= 1, got {self.tensor}.")
        if self.data == 0 or self.data < -1:
            raise ValueError(f"mesh data size must be >= 1 or -1 (all remaining devices), got {self.data}.")
        if self.data_mode not in DATA_MODES:
            raise ValueError(f"data_mode must be one of {DATA_MODES}, got {self.data_mode!r}.")
        self.sharding_rules()  # unknown names fail at load time

    def sharding_rules(self) -> Rules:
        return Rules().with_overrides(dict(self.rules))

    # -- files ------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "MeshConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"mesh config: unknown field(s) {unknown}; known: {sorted(names)}.")
        return cls(**d)

    @classmethod
    def load(cls, path: str | Path) -> "MeshConfig":
        """A mesh config file (.json, or .yaml/.yml), or one of the presets of configs/ (dfjax.configs) by name."""
        p = Path(path)
        if not p.is_file():
            preset = importlib.resources.files("dfjax.configs") / f"{path}.json"
            if preset.is_file():
                p = Path(str(preset))
            else:
                raise ValueError(f"mesh config {path} does not exist (a .json/.yaml file, or a preset name such as "
                                 f"'mesh-8gpu-data').")
        text = p.read_text()
        if p.suffix in (".yaml", ".yml"):
            import yaml

            d = yaml.safe_load(text)
        else:
            d = json.loads(text)
        d = {k: v for k, v in d.items() if not k.startswith("_")}  # "_comment" keys
        try:
            return cls.from_dict(d)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{p}: {e}") from None

    def to_dict(self) -> dict:
        return {"data": self.data, "tensor": self.tensor, "data_mode": self.data_mode,
                "rules": {k: list(v) if isinstance(v, tuple) else v for k, v in self.rules}}

    # -- devices ----------------------------------------------------------------------------------
    def device_grid(self, devices=None) -> np.ndarray:
        """Devices as a [data, tensor] array: grouped by process, each tensor group inside one process."""
        devices = list(jax.devices() if devices is None else devices)
        by_proc: dict[int, list] = {}
        for d in sorted(devices, key=lambda d: (d.process_index, d.id)):
            by_proc.setdefault(d.process_index, []).append(d)
        rows = []
        for proc, local in sorted(by_proc.items()):
            if len(local) % self.tensor:
                raise ValueError(f"process {proc} has {len(local)} devices, not a multiple of tensor={self.tensor}; "
                                 "tensor groups stay inside one host, so choose a tensor size that divides the "
                                 "devices per host.")
            rows.extend(local[i:i + self.tensor] for i in range(0, len(local), self.tensor))
        data = len(rows) if self.data == -1 else self.data
        if data > len(rows):
            raise ValueError(f"mesh data={self.data} x tensor={self.tensor} needs {self.data * self.tensor} devices, "
                             f"there are {len(devices)}; use data=-1 to take as many groups as there are.")
        rows = rows[:data]  # data smaller than the devices allow: the first groups (in process order)
        grid = np.empty((data, self.tensor), dtype=object)
        for i, row in enumerate(rows):
            grid[i, :] = row
        return grid

    def mesh(self, devices=None) -> Mesh:
        """The whole (data, tensor) mesh (data_mode "batch", or to look at)."""
        return make_mesh(self.device_grid(devices))

    def local_groups(self, devices=None) -> list[tuple[int, Mesh]]:
        """This process's data groups as (global group index, a (1, tensor) mesh) in group order."""
        grid = self.device_grid(devices)
        me = jax.process_index()
        return [(i, make_mesh(grid[i:i + 1])) for i in range(grid.shape[0])
                if all(d.process_index == me for d in grid[i])]


def make_mesh(grid: np.ndarray) -> Mesh:
    """A Mesh over a [data, tensor] device array with automatic (GSPMD) axes."""
    auto = jax.sharding.AxisType.Auto
    return Mesh(np.asarray(grid), AXES, axis_types=(auto, auto))


# ------------------------------------------------------------------------------------------------ placement

class Placement:
    """Where a Generator's arrays live and how its jitted steps are partitioned.

    mesh=None: the single default device, and every method is the identity (jit gets no shardings).
    """

    def __init__(self, mesh: Mesh | None, cfg, batch: int, rules: Rules | None = None):
        self.mesh, self.cfg, self.batch = mesh, cfg, batch
        self.rules = rules or Rules()
        self._cache_makers = {}
        if mesh is None:
            return
        if tuple(mesh.axis_names) != AXES:
            raise ValueError(f"a Generator mesh needs the axes {AXES}, got {tuple(mesh.axis_names)}; make it with "
                             "dfjax.sharding.MeshConfig.")
        t, d = mesh.shape["tensor"], mesh.shape["data"]
        if cfg.num_heads % t:
            ok = [n for n in range(1, cfg.num_heads + 1) if cfg.num_heads % n == 0]
            raise ValueError(f"tensor={t} does not divide the model's {cfg.num_heads} heads; choose tensor in {ok}.")
        if batch % d:
            raise ValueError(f"batch {batch} does not split over data={d}; make the batch a multiple of {d}, or use "
                             "data_mode 'replicas' (one group per video).")

    @property
    def tensor(self) -> int:
        return 1 if self.mesh is None else self.mesh.shape["tensor"]

    def sharding(self, logical, shape=None, what="array"):
        return named_sharding(self.mesh, self.rules, logical, shape, what)

    # -- trees ------------------------------------------------------------------------------------
    def param_shardings(self, params):
        return param_shardings(params, self.mesh, self.rules)

    def put_params(self, params):
        """Parameters onto the mesh, each leaf into its NamedSharding (identity without a mesh)."""
        if self.mesh is None:
            return params
        return jax.device_put(params, self.param_shardings(params))

    def cache_shardings(self, layout: AttentionLayout):
        return cache_shardings(layout, self.batch, self.cfg.head_dim, self.mesh, self.rules)

    def init_cache(self, layout: AttentionLayout, dtype):
        """Zero caches made directly in their shardings (no full copy on any one device)."""
        if self.mesh is None:
            return init_cache(layout, self.batch, self.cfg.head_dim, dtype)
        if (layout, dtype) not in self._cache_makers:  # jitted once per layout: a new jit per video recompiled
            make = lambda: init_cache(layout, self.batch, self.cfg.head_dim, dtype)
            self._cache_makers[layout, dtype] = jax.jit(make, out_shardings=self.cache_shardings(layout))
        return self._cache_makers[layout, dtype]()

    def text_kv_shardings(self):
        return text_kv_shardings(self.cfg, self.batch, self.mesh, self.rules)

    def put_context(self, context):
        if self.mesh is None:
            return context
        return jax.device_put(context, self.sharding(CONTEXT_AXES, context.shape, "text context"))

    def latent_sharding(self, shape):
        return self.sharding(LATENT_AXES, shape, "latents")

    # -- programs ---------------------------------------------------------------------------------
    def jit(self, fn: Callable, in_shardings=None, out_shardings=None, **kw):
        """jax.jit with the given shardings on a mesh; plain jax.jit (shardings ignored) without one.
        Shardings may be callables, so the unsharded path never builds them."""
        if self.mesh is None:
            return jax.jit(fn, **kw)
        ev = lambda s: s() if callable(s) else s
        if in_shardings is not None:
            kw["in_shardings"] = ev(in_shardings)
        if out_shardings is not None:
            kw["out_shardings"] = ev(out_shardings)
        return jax.jit(fn, **kw)

    def step_shardings(self, params, layout: AttentionLayout, latent_shape):
        """(in, out) shardings of a chunk step (params, text_kv, cache, key, chunk, schedule, probe input, clean
        latents, refresh) -> (x0, cache, probe output); key, chunk, schedule, the probe's input and output and the
        refresh flag are replicated."""
        rep = replicated(self.mesh)
        cache = self.cache_shardings(layout)
        latents = self.latent_sharding(latent_shape)
        ins = (self.param_shardings(params), self.text_kv_shardings(), cache, rep, rep, rep, rep, latents, rep)
        return ins, (latents, cache, rep)

    # -- choices the mesh constrains ---------------------------------------------------------------
    @property
    def platform(self) -> str | None:
        return None if self.mesh is None else self.mesh.devices.flat[0].platform

    def attn_impl(self, impl: str, dtype) -> str:
        """The attention kernel for programs on this placement: GSPMD partitions them over a mesh of several
        devices, which a Pallas kernel does not survive (dfjax.kernels.attention.resolve_impl)."""
        partitioned = self.mesh is not None and self.mesh.size > 1
        return kernels.resolve_impl(impl, dtype, platform=self.platform, partitioned=partitioned)


def put_replicated(tree, mesh: Mesh):
    """Every leaf of `tree` replicated over `mesh` (text encoder and VAE states of a data group)."""
    return jax.device_put(tree, replicated(mesh))
