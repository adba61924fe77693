"""Tests for `remat_policy` and `scan_layers` (t5x_lite.nn.stacks) in every family: same numbers (logits, grads,
dropout masks, cached decoding) as the plain layer loop, stacked-param layout and metadata, program sizes
flat in depth for training and for decoding."""

import dataclasses

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from t5x_lite import partitioning
from t5x_lite.decoding import DecodeConfig
from t5x_lite.models.causal import DecoderOnlyModel
from t5x_lite.models.seq2seq import EncoderDecoderModel
from t5x_lite.networks.bart import Bart, BartConfig
from t5x_lite.networks.bert import Bert, BertConfig
from t5x_lite.networks.gpt import GPT, GPTConfig
from t5x_lite.networks.t5 import T5, T5Config
from t5x_lite.nn import kernels, stacks

TINY = T5Config(
    vocab_size=64, d_model=32, num_heads=2, head_dim=8, d_ff=48, num_encoder_layers=2, num_decoder_layers=2,
    dropout_rate=0.1,
)
ENC = jax.random.randint(jax.random.key(1), (2, 8), 1, TINY.vocab_size)
DEC = jax.random.randint(jax.random.key(2), (2, 6), 1, TINY.vocab_size)


@pytest.fixture(scope="module")
def base_params():
    """Pure-dict params of an unscanned tiny model; every variant below loads these."""
    return nnx.to_pure_dict(nnx.state(T5(TINY, rngs=nnx.Rngs(0)), nnx.Param))


def model_with(config: T5Config, params: dict) -> T5:
    model = T5(config, rngs=nnx.Rngs(0))
    nnx.update(model, stacks.stack_layer_params(params) if config.scan_layers else params)
    return model


def logits_and_grads(model: T5, dropout_key=None):
    """Jitted logits and d(loss)/d(params) in the UNSCANNED layout, with dropout iff a key is given."""
    graphdef, state = nnx.split(model, nnx.Param)

    def loss(state):
        rngs = None if dropout_key is None else nnx.Rngs(dropout=dropout_key)
        logits = nnx.merge(graphdef, state)(ENC, DEC, dropout_rngs=rngs)
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), DEC[..., None], -1)
        return jnp.mean(nll), logits

    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(state)
    grads = nnx.to_pure_dict(grads)
    return logits, (stacks.unstack_layer_params(grads) if model.config.scan_layers else grads)


def assert_trees_close(a, b, atol):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, atol=atol, rtol=atol)


@pytest.fixture(scope="module")
def reference(base_params):
    """Logits and grads of the plain (no remat, unscanned) model, with dropout on."""
    return logits_and_grads(model_with(TINY, base_params), jax.random.key(7))


def test_config_validation():
    with pytest.raises(ValueError, match="remat_policy='dot'"):
        T5Config(remat_policy="dot")
    assert T5Config().remat_policy == "none" and T5Config().scan_layers is False


class MaskLayer(nnx.Module):
    """Shift register of dropout masks: after n layers, x[i] holds layer i's mask."""

    def __init__(self, rngs: nnx.Rngs):
        self.scale = nnx.Param(jax.random.uniform(rngs.params(), ()) + 1.0, logical_axes=())

    def __call__(self, x, rngs):
        mask = kernels.resolve("auto").dropout(jnp.ones(x.shape[1:]), 0.5, rngs) * self.scale[...]
        return jnp.concatenate([x[1:], mask[None]])


def test_dropout_masks_differ_per_layer_and_match_across_modes():
    n, results = 4, {}
    for scan in (False, True):
        stack = stacks.make_layers(MaskLayer, n, scan, nnx.Rngs(0))
        for policy in stacks.REMAT_POLICIES:
            rngs = nnx.Rngs(dropout=jax.random.key(3))
            out = stacks.apply_layers(stack, jnp.zeros((n, 256)), (), rngs, scan=scan, remat_policy=policy)
            # The RNG counter advanced as in the plain loop, so later draws match too.
            results[scan, policy] = (np.asarray(out) > 0, np.asarray(jax.random.key_data(rngs.dropout())))
    masks, after = results[False, "none"]
    for i in range(n):
        assert 0.3 < masks[i].mean() < 0.7
        for j in range(i):
            assert (masks[i] != masks[j]).mean() > 0.3, (i, j)  # a different mask in every layer
    for key, (other_masks, other_after) in results.items():
        np.testing.assert_array_equal(other_masks, masks, err_msg=str(key))
        np.testing.assert_array_equal(other_after, after, err_msg=str(key))


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_same_logits_and_grads(base_params, reference, policy):
    logits, grads = logits_and_grads(model_with(dataclasses.replace(TINY, remat_policy=policy), base_params),
                                     jax.random.key(7))
    np.testing.assert_allclose(logits, reference[0], atol=1e-6, rtol=1e-6)
    assert_trees_close(grads, reference[1], atol=1e-6)


FAMILY_TOKENS = jax.random.randint(jax.random.key(4), (2, 10), 1, 64)
FAMILIES = {  # config class, network, logits with dropout
    "gpt": (GPTConfig, GPT, lambda net, rngs: net(FAMILY_TOKENS, dropout_rngs=rngs)),
    "bart": (BartConfig, Bart, lambda net, rngs: net(FAMILY_TOKENS, FAMILY_TOKENS[:, :6], dropout_rngs=rngs)),
    "bert": (BertConfig, Bert,
             lambda net, rngs: net.mlm_logits(net.encode(FAMILY_TOKENS, dropout_rngs=rngs))),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_other_families_remat_same_logits_and_grads(family):
    """GPT, BART and BERT take the same `remat_policy` values, with the same numbers and dropout masks."""
    config_cls, network_cls, logits_fn = FAMILIES[family]
    sizes = {"vocab_size": 64, "d_model": 32, "num_heads": 2, "head_dim": 16, "d_ff": 48, "max_position_embeddings": 16}
    depth = {"num_encoder_layers": 2, "num_decoder_layers": 2} if family == "bart" else {"num_layers": 2}
    results = {}
    for policy in stacks.REMAT_POLICIES:
        config = config_cls(**sizes, **depth, dropout_rate=0.2, remat_policy=policy)
        graphdef, state = nnx.split(network_cls(config, rngs=nnx.Rngs(0)), nnx.Param)

        def loss(state, graphdef=graphdef):
            logits = logits_fn(nnx.merge(graphdef, state), nnx.Rngs(dropout=jax.random.key(5)))
            return jnp.mean(jax.nn.log_softmax(logits)[..., 3]), logits

        grad_fn = jax.value_and_grad(loss, has_aux=True)
        remat_calls = str(jax.make_jaxpr(grad_fn)(state)).count("remat2[")
        assert remat_calls == (0 if policy == "none" else sum(depth.values())), (policy, remat_calls)  # one per layer
        (_, logits), grads = jax.jit(grad_fn)(state)
        results[policy] = logits, nnx.to_pure_dict(grads)
    reference_logits, reference_grads = results["none"]
    for policy in ("full", "dots"):
        np.testing.assert_allclose(results[policy][0], reference_logits, atol=1e-6, rtol=1e-6)
        assert_trees_close(results[policy][1], reference_grads, atol=1e-6)
    with pytest.raises(ValueError, match=rf"{config_cls.__name__}.remat_policy='some'.*--gin.{config_cls.__name__}"):
        config_cls(remat_policy="some")


@pytest.mark.parametrize("family,policy", [("gpt", "none"), ("gpt", "full"), ("bart", "dots"), ("bert", "full")])
def test_other_families_scan_same_logits_and_grads(family, policy):
    """A scanned GPT, BART or BERT (`scan_layers`) given the stacked params of a plain one: same logits and
    grads with dropout on, one scan per stack in the forward pass and one in the backward."""
    config_cls, network_cls, logits_fn = FAMILIES[family]
    sizes = {"vocab_size": 64, "d_model": 32, "num_heads": 2, "head_dim": 16, "d_ff": 48, "max_position_embeddings": 16}
    depth = {"num_encoder_layers": 2, "num_decoder_layers": 3} if family == "bart" else {"num_layers": 3}
    config = config_cls(**sizes, **depth, dropout_rate=0.2)
    plain = nnx.to_pure_dict(nnx.state(network_cls(config, rngs=nnx.Rngs(0)), nnx.Param))
    results = {}
    for scan in (False, True):
        variant = dataclasses.replace(config, scan_layers=scan, remat_policy=policy if scan else "none")
        network = network_cls(variant, rngs=nnx.Rngs(1))
        nnx.update(network, stacks.stack_layer_params(plain) if scan else plain)
        graphdef, state = nnx.split(network, nnx.Param)

        def loss(state, graphdef=graphdef):
            logits = logits_fn(nnx.merge(graphdef, state), nnx.Rngs(dropout=jax.random.key(5)))
            return jnp.mean(jax.nn.log_softmax(logits)[..., 3]), logits

        grad_fn = jax.value_and_grad(loss, has_aux=True)
        assert str(jax.make_jaxpr(grad_fn)(state)).count(" scan[") == (2 * len(depth) if scan else 0)
        (_, logits), grads = jax.jit(grad_fn)(state)
        grads = nnx.to_pure_dict(grads)
        results[scan] = logits, (stacks.unstack_layer_params(grads) if scan else grads)
    np.testing.assert_allclose(results[True][0], results[False][0], atol=1e-5)
    assert_trees_close(results[True][1], results[False][1], atol=1e-5)


def family_config(family: str, scan: bool):
    config_cls = T5Config if family == "t5" else FAMILIES[family][0]
    if family == "t5":
        return dataclasses.replace(TINY, num_decoder_layers=3, scan_layers=scan)
    sizes = {"vocab_size": 64, "d_model": 32, "num_heads": 2, "head_dim": 16, "d_ff": 48, "max_position_embeddings": 16}
    depth = {"num_encoder_layers": 2, "num_decoder_layers": 3} if family == "bart" else {"num_layers": 3}
    return config_cls(**sizes, **depth, scan_layers=scan)


def init_params(family: str, scan: bool) -> dict:
    network_cls = T5 if family == "t5" else FAMILIES[family][1]
    network = jax.jit(lambda: nnx.state(network_cls(family_config(family, scan), rngs=nnx.Rngs(3)), nnx.Param))()
    return nnx.to_pure_dict(network)


@pytest.mark.parametrize("family", ["t5", *FAMILIES])
def test_unrolled_and_scanned_init_give_the_same_params(family):
    """Both layouts draw every stack's layers from one split of the params key, so switching `scan_layers`
    keeps the initialisation, up to float rounding in the two compiled programs (and each layer's params
    differ from the next one's)."""
    plain, scanned = init_params(family, scan=False), init_params(family, scan=True)
    assert_trees_close(stacks.stack_layer_params(plain), scanned, atol=1e-6)
    stack = plain["decoder"]["layers"] if family == "t5" else plain.get("decoder_layers", plain.get("layers"))
    first, second = (jax.tree.leaves(stack[i]) for i in (0, 1))
    assert not any(np.array_equal(x, y) for x, y in zip(first, second) if np.std(x) > 0)


def random_draws(jaxpr: jax.extend.core.Jaxpr) -> int:
    """`random_bits` calls in a jaxpr, nested calls included."""
    return sum(
        (eqn.primitive.name == "random_bits") + sum(random_draws(sub) for sub in jax.extend.core.jaxprs_in_params(eqn.params))
        for eqn in jaxpr.eqns
    )


def init_random_draws(depth: int) -> int:
    """How many random draws the init of an unrolled T5 with `depth` encoder and decoder layers makes."""
    config = dataclasses.replace(TINY, num_encoder_layers=depth, num_decoder_layers=depth)
    return random_draws(jax.make_jaxpr(lambda: nnx.state(T5(config, rngs=nnx.Rngs(0)), nnx.Param))().jaxpr)


def test_unrolled_init_draws_each_parameter_kind_once_whatever_the_depth():
    """One batched draw per parameter kind for all layers of a stack, so the init's random-number code,
    which dominates its compile time on CPU, does not grow with depth."""
    assert init_random_draws(8) == init_random_draws(2)


@pytest.mark.parametrize("policy", ["none", "dots"])
def test_scan_same_logits_and_grads(base_params, reference, policy):
    config = dataclasses.replace(TINY, scan_layers=True, remat_policy=policy)
    logits, grads = logits_and_grads(model_with(config, base_params), jax.random.key(7))
    np.testing.assert_allclose(logits, reference[0], atol=1e-5)  # same dropout masks too
    assert_trees_close(grads, reference[1], atol=1e-5)


def test_stack_unstack_round_trip(base_params):
    stacked = stacks.stack_layer_params(base_params)
    kernel = stacked["decoder"]["layers"]["self_attention"]["query"]["kernel"]
    assert kernel.shape == (TINY.num_decoder_layers, TINY.d_model, TINY.num_heads, TINY.head_dim)
    np.testing.assert_array_equal(kernel[1], base_params["decoder"]["layers"][1]["self_attention"]["query"]["kernel"])
    scanned_model = nnx.eval_shape(lambda: T5(dataclasses.replace(TINY, scan_layers=True), rngs=nnx.Rngs(0)))
    expected = nnx.to_pure_dict(nnx.state(scanned_model, nnx.Param))
    assert jax.tree.structure(stacked) == jax.tree.structure(expected)
    assert [x.shape for x in jax.tree.leaves(stacked)] == [x.shape for x in jax.tree.leaves(expected)]
    round_trip = stacks.unstack_layer_params(stacked)
    assert jax.tree.structure(round_trip) == jax.tree.structure(base_params)
    for x, y in zip(jax.tree.leaves(round_trip), jax.tree.leaves(base_params)):
        np.testing.assert_array_equal(x, y)
    # String layer keys (as some checkpoint formats restore them) stack the same way.
    as_strings = {**base_params, "encoder": {**base_params["encoder"], "layers": {
        str(k): v for k, v in base_params["encoder"]["layers"].items()}}}
    np.testing.assert_array_equal(stacks.stack_layer_params(as_strings)["encoder"]["layers"]["mlp"]["wo"]["kernel"],
                                  stacked["encoder"]["layers"]["mlp"]["wo"]["kernel"])
    with pytest.raises(ValueError, match="stacked already"):
        stacks.stack_layer_params(stacked)
    with pytest.raises(ValueError, match="already per-layer"):
        stacks.unstack_layer_params(base_params)


def test_scanned_param_logical_axes_and_shardings():
    config = dataclasses.replace(TINY, scan_layers=True)
    abstract = nnx.state(nnx.eval_shape(lambda: T5(config, rngs=nnx.Rngs(0))), nnx.Param)
    flat = nnx.to_flat_state(abstract)
    stacked_paths = [path for path, _ in flat if "layers" in path]
    assert stacked_paths
    for path, param in flat:
        axes = param.get_metadata()["logical_axes"]
        assert len(axes) == param.ndim, (path, axes)
        assert (axes[0] == "layers") == ("layers" in path), (path, axes)
        if "layers" in path:
            assert param.shape[0] == (config.num_encoder_layers if path[0] == "encoder" else config.num_decoder_layers)
    mesh = partitioning.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    shardings = partitioning.param_shardings(abstract, mesh, partitioning.STANDARD_RULES)
    query = shardings["encoder"]["layers"]["attention"]["query"]["kernel"]
    assert query.spec == P(None, "fsdp", "tensor", None)  # the layers axis stays replicated
    assert shardings["decoder"]["layers"]["mlp"]["wo"]["kernel"].spec == P(None, "tensor", "fsdp")


def grad_program_size(depth: int, **overrides) -> int:
    """Characters of the lowered (StableHLO) loss+grad program with dropout: deterministic, no compile."""
    config = dataclasses.replace(TINY, num_encoder_layers=depth, num_decoder_layers=depth, **overrides)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: T5(config, rngs=nnx.Rngs(0))))

    def loss(state, key):
        return jnp.mean(nnx.merge(graphdef, state)(ENC, DEC, dropout_rngs=nnx.Rngs(dropout=key)))

    return len(jax.jit(jax.grad(loss)).lower(state, jax.random.key(0)).as_text())


def test_scanned_program_size_flat_in_depth():
    for policy in ("none", "full"):
        assert grad_program_size(8, scan_layers=True, remat_policy=policy) < 1.5 * grad_program_size(
            2, scan_layers=True, remat_policy=policy
        ), policy
    assert grad_program_size(8) > 2.5 * grad_program_size(2)  # the unrolled loop grows with depth


def decode_family(family: str, num_layers: int, scan: bool) -> tuple:
    """(trainer model, network, batch) for cached decoding with a `num_layers`-deep decoder."""
    config = family_config(family, scan)
    depth = {"num_layers" if family == "gpt" else "num_decoder_layers": num_layers}
    config = dataclasses.replace(config, **depth)
    model = DecoderOnlyModel(config) if family == "gpt" else EncoderDecoderModel(config)
    network = model.build_network(nnx.Rngs(3))
    prompt = {"decoder_input_tokens": ENC, "decoder_causal_attention": jnp.ones_like(ENC)}
    return model, network, prompt if family == "gpt" else {"encoder_input_tokens": ENC}


@pytest.mark.parametrize("family", ["t5", "bart", "gpt"])
def test_scanned_cached_decoding_matches_unscanned(family):
    """Greedy and beam search over a scanned stack (decoded scanned: one `lax.scan` per step) give the tokens
    of the same parameters unrolled, and the one stacked cache holds the same keys and values."""
    plain = init_params(family, scan=False)
    outputs = {}
    for scan in (False, True):
        model, network, batch = decode_family(family, 3, scan)
        nnx.update(network, stacks.stack_layer_params(plain) if scan else plain)
        graphdef, state = nnx.split(network)

        @jax.jit
        def run(state, model=model, graphdef=graphdef, batch=batch):
            net = nnx.merge(graphdef, state)
            greedy = model.predict_batch(net, batch, max_decode_length=6, decode=DecodeConfig(eos_id=-1))
            beam = model.predict_batch(net, batch, max_decode_length=6, decode=DecodeConfig("beam", beam_size=2))
            if family == "gpt":
                decode_state = net.prefill(ENC, jnp.full((2,), 5), 6)
            else:
                decode_state = net.init_decode_state(net.encode(ENC), ENC > 0, 6)
            logits, decode_state = net.decode_step(decode_state, jnp.ones((2,), jnp.int32))
            return greedy, beam, logits, decode_state.cache

        outputs[scan] = run(state)
    (*plain_tokens, plain_logits, plain_cache), (*scan_tokens, scan_logits, scan_cache) = outputs[False], outputs[True]
    for a, b in zip(scan_tokens, plain_tokens):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(scan_logits, plain_logits, atol=1e-5)
    # Unrolled: one [b, h, length, d] cache per layer; scanned: the same caches stacked on axis 1.
    assert len(plain_cache) == 3 and scan_cache.key.shape[:2] == (2, 3)
    assert_trees_close(scan_cache, jax.tree.map(lambda *c: jnp.stack(c, axis=1), *plain_cache), atol=1e-5)


def decode_program_size(family: str, num_layers: int, scan: bool) -> int:
    """Characters of the lowered (StableHLO) greedy `predict_batch` program: deterministic, no compile."""
    model, network, batch = decode_family(family, num_layers, scan)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: network))

    def predict(state, batch):
        return model.predict_batch(nnx.merge(graphdef, state), batch, max_decode_length=4)

    return len(jax.jit(predict).lower(state, batch).as_text())


@pytest.mark.parametrize("family", ["t5", "bart", "gpt"])
def test_scanned_decode_program_size_flat_in_depth(family):
    """A scanned stack decodes scanned: the decode program does not grow with depth (the unrolled one does)."""
    assert decode_program_size(family, 8, scan=True) < 1.2 * decode_program_size(family, 2, scan=True)
    assert decode_program_size(family, 8, scan=False) > 2 * decode_program_size(family, 2, scan=False)


def test_bfloat16_scan_remat_loss_and_grad_execute(base_params):
    """bf16 einsum layouts can fail only at run time on CPU (DESIGN notes): execute a step."""
    config = dataclasses.replace(TINY, dtype="bfloat16", scan_layers=True, remat_policy="full")
    logits, grads = logits_and_grads(model_with(config, base_params), jax.random.key(7))
    assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))
    for g in jax.tree.leaves(grads):
        assert g.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(g)))
    for stack in ("encoder", "decoder"):
        for i in range(2):  # every layer of both stacks gets a gradient
            assert float(jnp.abs(grads[stack]["layers"][i]["mlp"]["wo"]["kernel"]).max()) > 0
