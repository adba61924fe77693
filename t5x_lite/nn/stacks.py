"""Layer stacks shared by every model family: a list of layers or one scanned module with stacked
params (`make_layers`), applied in order with optional per-layer rematerialisation (`apply_layers`).

Remat and scan change neither the numbers nor the dropout masks, only what the backward pass keeps
(remat) and how big the program is (scan); see `REMAT_POLICIES`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from t5x_lite import partitioning
from t5x_lite.nn import layers

# Per-layer rematerialisation: name -> what `jax.checkpoint` may keep from the forward pass.
#   "none": no remat (autodiff keeps every intermediate the backward pass needs);
#   "full": keep nothing, the backward pass reruns each layer's forward from its input;
#   "dots": keep the outputs of the weight matmuls (q/k/v/out and feed-forward projections, i.e.
#           the dots with no batch dimensions: what `dots_with_no_batch_dims_saveable` keeps) and
#           recompute the rest: norms, activations, dropout masks and the batched attention dots
#           (whose [b, h, q, k] outputs are the largest activations). The projections are matched
#           by name (`layers.DENSE_OUTPUT`), because with KERNELS='cpu_tuned' they are custom-VJP calls
#           that the dot-based policies do not see; with KERNELS='xla' JAX's own dot policies see them too.
# Memory is saved reliably only with scanned layers (`T5Config.scan_layers=True`), where the backward loop recomputes each layer
# just before its gradient. In the unrolled loop XLA decides: XLA:CPU drops the optimization barriers
# that keep the recomputation apart and CSEs it with the forward pass (8+8 layers, tiny width, batch
# 8, 512/114, f32: peak temp 1430 -> 1393 MiB unrolled vs 1396 -> 242 MiB scanned, "full").
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.save_only_these_names(layers.DENSE_OUTPUT),
}


def check_remat_policy(config_name: str, policy: str) -> None:
    """A clear error for a `remat_policy` that `REMAT_POLICIES` does not define."""
    if policy not in REMAT_POLICIES:
        raise ValueError(
            f"{config_name}.remat_policy={policy!r} is not supported; use one of {list(REMAT_POLICIES)} "
            f"(e.g. --gin.{config_name}.remat_policy=\"'full'\")."
        )


# nnx.vmap metadata: the stacked axis is named "layers" in every param's `logical_axes` (the rule
# tables leave it replicated), so `partitioning.param_shardings` works for both layouts.
_SCAN_METADATA = {nnx.PARTITION_NAME: "layers", "logical_axes": "layers"}


def make_layers(make_layer, num_layers: int, scan: bool, rngs: nnx.Rngs) -> nnx.Module:
    """`num_layers` layers from `make_layer(rngs)`: an `nnx.List`, or (scan) ONE module whose params
    carry a leading `layers` axis, each layer initialised from its own split of one params key.

    Both layouts create the layers in one `nnx.vmap` (the list then takes each layer's slice), so they
    start from the same values, and the init makes one random draw per parameter kind instead of one per
    layer: on CPU that random-number code dominated the init's compile time (T5-small 28 -> 10 s).
    """
    keys = jax.random.split(rngs.params(), num_layers)
    create = nnx.vmap(
        lambda key: make_layer(nnx.Rngs(params=key)), in_axes=0, out_axes=0,
        transform_metadata=_SCAN_METADATA if scan else {},
    )
    stacked = create(keys)
    if scan:
        return stacked
    graphdef, state = nnx.split(stacked)
    return nnx.List([nnx.merge(graphdef, jax.tree.map(lambda x, i=i: x[i], state)) for i in range(num_layers)])


def apply_layers(
    stack: nnx.Module,
    x: jax.Array,
    args: tuple,
    dropout_rngs: nnx.Rngs | None,
    *,
    scan: bool,
    remat_policy: str,
    per_layer: tuple = (),
) -> jax.Array:
    """x <- layer(x, *args, *per_layer[:][i], dropout_rngs) for every layer i of `stack` in order (see
    `make_layers`); `per_layer` holds arrays with one entry per layer (e.g. T5Gemma's attention windows),
    scanned along with the params.

    With remat or scan each layer runs as a pure function of (layer params, x, dropout RNG state),
    wrapped in `jax.checkpoint` when `remat_policy` != "none" and scanned over the stacked params
    when `scan`. The dropout RNG state (key and counter) is threaded through as a carry, so every
    layer draws the same keys, hence the same masks, as the plain loop: remat and scan change
    neither the masks (each layer's differ, the counter advances) nor the numbers.
    """
    x = _residual(x)
    if not scan and remat_policy == "none":
        for i, layer in enumerate(stack):
            x = _residual(layer(x, *args, *(a[i] for a in per_layer), dropout_rngs))
        return x
    rngs_graphdef, rngs_state = (None, None) if dropout_rngs is None else nnx.split(dropout_rngs)

    def apply(graphdef, layer_state, x, rngs_state, args):
        rngs = None if dropout_rngs is None else nnx.merge(rngs_graphdef, rngs_state)
        x = _residual(nnx.merge(graphdef, layer_state)(x, *args, rngs))
        return x, (None if rngs is None else nnx.state(rngs))

    def pure(graphdef):
        fn = functools.partial(apply, graphdef)
        if remat_policy == "none":
            return fn
        # Inside scan, the loop already keeps the recomputation from being CSE'd with the forward.
        return jax.checkpoint(fn, policy=REMAT_POLICIES[remat_policy], prevent_cse=not scan)

    if scan:
        graphdef, stacked = nnx.split(stack)
        body = pure(graphdef)
        (x, rngs_state), _ = jax.lax.scan(
            lambda carry, xs: (body(xs[0], *carry, args + xs[1]), None), (x, rngs_state), (stacked, per_layer)
        )
    else:
        for i, layer in enumerate(stack):
            graphdef, layer_state = nnx.split(layer)
            x, rngs_state = pure(graphdef)(layer_state, x, rngs_state, args + tuple(a[i] for a in per_layer))
    if dropout_rngs is not None:
        nnx.update(dropout_rngs, rngs_state)
    return x


def _residual(x: jax.Array) -> jax.Array:
    """The residual stream [b, s, embed] between layers, named for the activation sharding rules."""
    return partitioning.constrain(x, "residual", layers.EMBED_AXES)


def each_layer(
    stack: nnx.Module,
    fn: Callable[[nnx.Module, Any, int | jax.Array], tuple[Any, Any]],
    carry: Any,
    *,
    scan: bool,
) -> tuple[Any, Any]:
    """carry, y = fn(layer, carry, i) for every layer i of `stack` in order (no dropout, no remat: for
    inference, e.g. a decode step or a prefill); returns the last carry and the ys laid out as the params
    are: a tuple of per-layer ys unrolled, one ys stacked on axis 1 (batch leading) scanned. Unrolled, `i`
    is a Python int; scanned, ONE `lax.scan` over the stacked params with a traced `i`, so the program
    does not grow with depth."""
    if not scan:
        ys = []
        for i, layer in enumerate(stack):
            carry, y = fn(layer, carry, i)
            ys.append(y)
        return carry, tuple(ys)
    graphdef, stacked = nnx.split(stack)
    count = jax.tree.leaves(stacked)[0].shape[0]

    def body(carry, xs):
        layer_state, i = xs
        return fn(nnx.merge(graphdef, layer_state), carry, i)

    carry, ys = jax.lax.scan(body, carry, (stacked, jnp.arange(count)))
    return carry, jax.tree.map(lambda y: jnp.moveaxis(y, 0, 1), ys)


def per_layer(ys) -> list:
    """`each_layer`'s ys as a list with one entry per layer, whatever the layout."""
    return list(ys) if isinstance(ys, tuple) else [y for y in jnp.moveaxis(ys, 1, 0)]


# ---------------------------------------------------------------------------------------------
# Parameter layouts: per-layer `layers/{i}/...` (unscanned) <-> stacked `layers/...` [n, ...] (scanned).


def _layer_keys(layers_dict: Mapping) -> list:
    """The keys of an unscanned stack's per-layer dict in layer order (ints, or digit strings after
    a round trip through some checkpoint formats); raises if the stack is already stacked."""
    if not layers_dict or not all(str(k).isdigit() for k in layers_dict):
        raise ValueError(
            f"Expected per-layer params keyed 0..n-1 under 'layers', got keys {sorted(map(str, layers_dict))[:5]}: "
            "these params look stacked already (scan_layers=True layout)."
        )
    return sorted(layers_dict, key=int)


def is_stack_key(key: Any) -> bool:
    """A layer stack's params sit under `layers` (T5's encoder/decoder, GPT, BERT) or `*_layers` (BART)."""
    return isinstance(key, str) and (key == "layers" or key.endswith("_layers"))


def _map_stacks(params: Mapping, convert: Callable[[Mapping, str], dict]) -> dict:
    """`params` (pure dicts) with every layer stack's dict replaced by `convert(stack, where)`."""
    found = []

    def walk(tree: Mapping, where: str) -> dict:
        out = {}
        for key, value in tree.items():
            if isinstance(value, Mapping) and is_stack_key(key):
                found.append(key)
                out[key] = convert(value, f"{where}[{key!r}]")
            else:
                out[key] = walk(value, f"{where}[{key!r}]") if isinstance(value, Mapping) else value
        return out

    params = nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params
    converted = walk(params, "params")
    if not found:
        raise ValueError(f"No layer stack ('layers' or '*_layers') in params (top-level keys {sorted(params)}).")
    return converted


def _stack(*xs):
    """Stacks on the host when given host (numpy) arrays, e.g. a checkpoint converted offline."""
    return np.stack(xs) if all(isinstance(x, np.ndarray) for x in xs) else jnp.stack(xs)


def stack_layer_params(params: Mapping) -> dict:
    """Unscanned -> scanned parameter layout (e.g. to load an unscanned checkpoint or HF import into a
    `scan_layers=True` model): each stack's `layers/{0..n-1}/...` leaves are stacked along a new
    leading axis into `layers/...`. Takes and returns pure nested dicts (`nnx.to_pure_dict` form);
    only parameters convert (optimizer statistics of stacked kernels are shaped differently)."""

    def stack(per_layer: Mapping, where: str) -> dict:
        return jax.tree.map(_stack, *[per_layer[k] for k in _layer_keys(per_layer)])

    return _map_stacks(params, stack)


def unstack_layer_params(params: Mapping) -> dict:
    """Scanned -> unscanned parameter layout, the inverse of `stack_layer_params`: each stack's
    `layers/...` leaves [n, ...] become `layers/{i}/...` (int keys, as `nnx.to_pure_dict` gives)."""

    def unstack(stacked: Mapping, where: str) -> dict:
        if all(str(k).isdigit() for k in stacked):
            raise ValueError(f"{where} is already per-layer (unscanned layout).")
        sizes = {leaf.shape[0] for leaf in jax.tree.leaves(stacked)}
        if len(sizes) != 1:
            raise ValueError(f"{where} leaves disagree on the layer count: {sorted(sizes)}.")
        return {i: jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(sizes.pop())}

    return _map_stacks(params, unstack)
