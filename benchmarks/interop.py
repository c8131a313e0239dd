"""ComfyUI's and AUTOMATIC1111's own loading code on our ConceptFlow-S exports, SD-1.5 shapes.

    HF_HUB_OFFLINE=1 python benchmarks/interop.py [--refs /work/refs] [--threads 1]

Outside CI: it needs the loaders' sources, fetched beforehand into a folder outside the repo
(never committed here):

    REFS/comfyui/comfy/...                     Comfy-Org/ComfyUI (comfy/lora.py, comfy/utils.py,
                                               comfy/weight_adapter/, comfy/cli_args.py, ...)
    REFS/a1111/extensions-builtin/Lora/...     AUTOMATIC1111/stable-diffusion-webui v1.10.1
                                               (82a973c: network*.py, lyco_helpers.py, networks.py)

(``REFS/*/COMMIT`` may name the commit; it is printed.) Without them the script says so and exits 0.

What runs: a UNet2DConditionModel built from the SD-1.5 UNet config below (random weights, no
hub), KronA-WED on its 128 attention linears with trained-looking values (A, B random with
‖A⊗B‖ = 0.2‖W0‖ per layer, m scaled by 1 ± 0.2), for each norm axis. Our exporters write the
files (``lycoris`` = column-form LoKr, ``diff`` = full ΔW keys, ``lycoris-rows`` = row-form
LoKr, shown for contrast: not UI-compatible), and each UI's code loads them:

* ComfyUI: ``comfy.lora.model_lora_keys_unet`` (key map, from ``comfy.utils.unet_to_diffusers``
  of the SD-1.5 unet_config), ``comfy.lora.load_lora`` (patches; keys it does not load are
  counted), ``comfy.lora.calculate_weight`` on a copy of W0 (the ModelPatcher's patch tuple).
* A1111: ``networks.load_network`` (its ``convert_diffusers_name_to_compvis`` key matching
  against the compvis layer names ``assign_network_names_to_compvis_modules`` gives the ldm UNet,
  module types ``network_lokr`` / ``network_full`` ...) and ``networks.network_apply_weights``
  (``calc_updown`` → ``network.py``'s ``finalize_updown`` / ``apply_weight_decompose``) on a
  copy of each linear.

Per format and loader: keys mapped, and the relative weight error ‖W_ui − W'‖_F / ‖W'‖_F per
layer (max and median), and the same error relative to the update ‖W' − W0‖_F. Goal: ≤ 1e-5
for every format we call compatible (``lycoris`` and ``diff``).

Shims (minimal; only what importing those modules needs, no behaviour of theirs replaced in
the weight computation):

* ComfyUI: ``comfy.model_management`` is a stub with ``cast_to_device`` = ``Tensor.to`` (the
  real one does the same on CPU; importing it probes devices and reads argv);
  ``comfy.model_base`` is a stub whose attributes are empty classes (``model_lora_keys_unet``
  only uses them in ``isinstance`` checks for other architectures). The model handed to
  ``model_lora_keys_unet`` has ``state_dict()`` keys ``diffusion_model.<ldm name>`` (the ldm
  names from ``unet_to_diffusers``, as a loaded SD-1.5 checkpoint has) and
  ``model_config.unet_config`` (the SD-1.5 one).
* A1111: a stub ``modules`` package (``shared`` with ``sd_model.network_layer_mapping``,
  ``sd_models`` reading safetensors, ``cache``/``hashes``/``errors`` no-ops, ``devices.cpu``,
  ``models.sd3.mmdit.QkvLinear`` an empty class, ``textual_inversion``). ``networks.py`` imports
  gradio and the webui, so its definitions (key conversion, ``load_network``,
  ``network_apply_weights`` and their helpers, ``module_types``) are taken from its source with
  ``ast`` and executed with those stubs; ``network*.py`` and ``lyco_helpers.py`` import as they are.
  The compvis layer names are ``diffusion_model_`` + the ldm path with dots as underscores
  (what ``assign_network_names_to_compvis_modules`` builds from the ldm UNet's
  ``named_modules``), the ldm paths again from ComfyUI's ``unet_to_diffusers`` (both UIs use
  the CompVis ldm module layout).

ED-LoRA's ``kohya`` export (``conceptflow.methods.edlora.kohya``) runs through the same loaders:
LoRA (rank 4, trained-looking A and B with ‖B·A‖ = 0.2‖W0‖) on the UNet's 128 attention linears
and the SD-1.5 text encoder's (CLIP ViT-L/14, random weights) 48 attention linears; ComfyUI maps
the text encoder with ``comfy.lora.model_lora_keys_clip`` (keys ``clip_l.transformer.text_model…``
as a loaded SD-1.5 checkpoint has), A1111 with ``transformer_text_model_…`` layer names (what
``assign_network_names_to_compvis_modules`` builds from FrozenCLIPEmbedder's HF CLIPTextModel).
The reference weight is W0 + ΔW with ΔW from our reader (``edlora_deltas``).

Last line: ``interop max relative error = x (formats: lycoris, diff, kohya)``.
"""

from __future__ import annotations

import argparse
import ast
import copy
import logging
import os
import sys
import tempfile
import types
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from conceptflow.methods.conceptflow_s.full_diff import export_diff
from conceptflow.methods.conceptflow_s.krona_wed import KronaWEDLinear, attention_linear_paths
from conceptflow.methods.conceptflow_s.lycoris import export_lycoris
from conceptflow.methods.edlora.reader import edlora_deltas

# runwayml/stable-diffusion-v1-5 unet/config.json (diffusers), without the _class_name/_diffusers_version keys
SD15_UNET_CONFIG = {
    "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
# The same UNet as ComfyUI describes it (supported_models.SD15 + model_detection for an SD-1.5 checkpoint).
COMFY_SD15_UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
COMPATIBLE = ("lycoris", "diff", "kohya")
# openai/clip-vit-large-patch14's text config (SD 1.5's text encoder)
SD15_TEXT_CONFIG = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                    "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
                    "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1, "projection_dim": 768}
GOAL = 1e-5
FORMATS = (("lycoris", "columns"), ("diff", "rows"), ("diff", "columns"), ("lycoris-rows", "rows"))


# --- our side -------------------------------------------------------------------------------

def trained_modules(unet: nn.Module, axis: str, seed: int) -> dict[str, KronaWEDLinear]:
    """KronA-WED around each attention linear (the UNet is not modified), trained-looking values."""
    generator = torch.Generator().manual_seed(seed)
    modules = {}
    for path in attention_linear_paths(unet):
        with torch.random.fork_rng(devices=[]):
            module = KronaWEDLinear(unet.get_submodule(path), weight_decompose=axis)
        with torch.no_grad():
            module.kron_a.copy_(torch.randn(module.kron_a.shape, generator=generator))
            module.kron_b.copy_(torch.randn(module.kron_b.shape, generator=generator))
            scale = 0.2 * module.base_layer.weight.norm() / module.kron_delta().norm()
            module.kron_b.mul_(scale)
            module.magnitude.mul_(1 + 0.2 * (2 * torch.rand(module.magnitude.shape, generator=generator) - 1))
        modules[path] = module
    return modules


def write_format(name: str, modules: dict[str, KronaWEDLinear], folder: Path) -> Path:
    path = folder / f"{name}-{next(iter(modules.values())).weight_decompose}.safetensors"
    if name == "diff":
        with torch.no_grad():
            return export_diff({p: m.delta_weight() for p, m in modules.items()}, path)
    return export_lycoris(modules, path)


# --- ComfyUI ----------------------------------------------------------------------------------

def comfy_loader(root: Path):
    """(import of comfy.lora and comfy.utils) with the two stub modules of the docstring."""
    sys.path.insert(0, str(root))
    management = types.ModuleType("comfy.model_management")
    management.cast_to_device = lambda tensor, device, dtype, copy=False: tensor.to(device=device, dtype=dtype,
                                                                                  copy=copy)
    model_base = types.ModuleType("comfy.model_base")
    model_base.__getattr__ = lambda name: type(name, (), {})
    import comfy  # noqa: F401  (the package itself, from root)

    sys.modules["comfy.model_management"], sys.modules["comfy.model_base"] = management, model_base
    comfy.model_management, comfy.model_base = management, model_base
    import comfy.lora
    import comfy.utils

    return comfy.lora, comfy.utils


def comfy_weights(file: Path, unet: nn.Module, comfy_lora, comfy_utils) -> tuple[dict[str, torch.Tensor], int, int]:
    """({diffusers path: W}, keys mapped, keys not loaded) through ComfyUI's LoRA code."""
    diffusers_to_ldm = comfy_utils.unet_to_diffusers(COMFY_SD15_UNET_CONFIG)
    ldm_to_path = {f"diffusion_model.{ldm}": key.removesuffix(".weight")
                   for key, ldm in diffusers_to_ldm.items() if key.endswith(".weight")}
    model = types.SimpleNamespace(state_dict=lambda: {f"diffusion_model.{ldm}": None for ldm in diffusers_to_ldm.values()},
                                  model_config=types.SimpleNamespace(unet_config=COMFY_SD15_UNET_CONFIG))
    key_map = comfy_lora.model_lora_keys_unet(model, {})
    lora = load_file(str(file))
    not_loaded = _CountingHandler("lora key not loaded")
    logging.getLogger().addHandler(not_loaded)
    try:
        patches = comfy_lora.load_lora(lora, key_map)
    finally:
        logging.getLogger().removeHandler(not_loaded)
    weights = {}
    for ldm_key, patch in patches.items():
        path = ldm_to_path[ldm_key]
        base = unet.get_submodule(path).weight.detach().clone().float()
        # ModelPatcher.add_patches keeps (strength_patch, patch, strength_model, offset, function)
        weights[path] = comfy_lora.calculate_weight([(1.0, patch, 1.0, None, None)], base, ldm_key)
    return weights, len(patches), not_loaded.count


class _CountingHandler(logging.Handler):
    def __init__(self, prefix: str):
        super().__init__(logging.WARNING)
        self.prefix, self.count = prefix, 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += record.getMessage().startswith(self.prefix)


# --- AUTOMATIC1111 ----------------------------------------------------------------------------

NETWORKS_DEFINITIONS = {"re_digits", "re_x_proj", "re_compiled", "suffix_conversion", "module_types",
                        "convert_diffusers_name_to_compvis", "load_network", "BundledTIHash",
                        "allowed_layer_without_weight", "store_weights_backup", "restore_weights_backup",
                        "network_restore_weights_from_backup", "network_apply_weights"}


def a1111_loader(lora_dir: Path) -> dict:
    """The namespace of networks.py's definitions we run, with the stub ``modules`` package."""
    from safetensors import safe_open

    def read_metadata(filename):
        with safe_open(filename, "pt") as handle:
            return handle.metadata() or {}

    stubs = {
        "modules": {},
        "modules.shared": {"opts": types.SimpleNamespace(lora_preferred_name="Alias from file",
                                                         lora_bundled_ti_to_infotext=False),
                           "sd_model": None, "cmd_opts": types.SimpleNamespace()},
        "modules.sd_models": {"read_metadata_from_safetensors": read_metadata,
                              "read_state_dict": lambda filename, *a, **k: load_file(filename)},
        "modules.cache": {"cached_data_for_file": lambda subsection, title, filename, func: func()},
        "modules.hashes": {"sha256_from_cache": lambda *a, **k: None, "sha256": lambda *a, **k: ""},
        "modules.errors": {"display": lambda error, task: print(f"A1111 error in {task}: {error}")},
        "modules.devices": {"cpu": torch.device("cpu"), "device": torch.device("cpu"), "dtype": torch.float32},
        "modules.models": {}, "modules.models.sd3": {},
        "modules.models.sd3.mmdit": {"QkvLinear": type("QkvLinear", (nn.Linear,), {})},
        "modules.textual_inversion": {}, "modules.textual_inversion.textual_inversion": {},
    }
    for name, attributes in stubs.items():
        module = types.ModuleType(name)
        module.__path__ = []
        module.__dict__.update(attributes)
        sys.modules[name] = module
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, module)
    sys.path.insert(0, str(lora_dir))
    import network  # noqa: F401  (their modules, imported as they are)
    import network_full  # noqa: F401
    import network_glora  # noqa: F401
    import network_hada  # noqa: F401
    import network_ia3  # noqa: F401
    import network_lokr  # noqa: F401
    import network_lora  # noqa: F401
    import network_norm  # noqa: F401
    import network_oft  # noqa: F401

    source = (lora_dir / "networks.py").read_text()
    tree = ast.parse(source)
    kept = [node for node in tree.body if _defined_names(node) & NETWORKS_DEFINITIONS]
    namespace = {"__name__": "networks_subset", "torch": torch, "os": os, "re": __import__("re"), "logging": logging,
                 "Union": __import__("typing").Union, "modules": sys.modules["modules"],
                 "shared": sys.modules["modules.shared"], "sd_models": sys.modules["modules.sd_models"],
                 "devices": sys.modules["modules.devices"], "errors": sys.modules["modules.errors"],
                 "textual_inversion": sys.modules["modules.textual_inversion.textual_inversion"],
                 "extra_network_lora": types.SimpleNamespace(errors={}), "loaded_networks": []}
    for name in ("network", "network_lora", "network_glora", "network_hada", "network_ia3", "network_lokr",
                 "network_full", "network_norm", "network_oft"):
        namespace[name] = sys.modules[name]
    exec(compile(ast.Module(body=kept, type_ignores=[]), str(lora_dir / "networks.py"), "exec"), namespace)
    missing = NETWORKS_DEFINITIONS - set(namespace)
    if missing:
        raise RuntimeError(f"networks.py does not define {sorted(missing)}: not the A1111 v1.10 layout")
    return namespace


def _defined_names(node: ast.stmt) -> set[str]:
    if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
        return {node.name}
    if isinstance(node, ast.Assign):
        return {target.id for target in node.targets if isinstance(target, ast.Name)}
    return set()


def a1111_apply(file: Path, layers: dict[str, nn.Module], networks: dict) -> tuple[dict[str, torch.Tensor], int, int]:
    """({A1111 layer name: W}, keys mapped, layer groups not matched): A1111's Lora extension loads
    ``file`` against the ``network_layer_mapping`` ``layers`` (copies of our linears) and applies it."""
    networks["shared"].sd_model = types.SimpleNamespace(network_layer_mapping=layers, is_sdxl=False)
    net = networks["load_network"](file.stem, types.SimpleNamespace(filename=str(file)))
    networks["loaded_networks"][:] = [net]
    weights = {}
    for name in net.modules:
        networks["network_apply_weights"](layers[name])
        weights[name] = layers[name].weight.detach().float()
    groups = {key.split(".", 1)[0] for key in load_file(str(file))}
    return weights, len(net.modules), len(groups) - len(net.modules)


def named_copies(named: list[tuple[str, nn.Module]]) -> dict[str, nn.Module]:
    layers = {}
    for name, original in named:
        layers[name] = copy.deepcopy(original)
        layers[name].network_layer_name = name
    return layers


def a1111_weights(file: Path, unet: nn.Module, networks: dict, ldm_by_path: dict[str, str]
                  ) -> tuple[dict[str, torch.Tensor], int, int]:
    """({diffusers path: W}, keys mapped, layer groups not matched) through A1111's Lora extension."""
    path_of = {f"diffusion_model_{ldm}".replace(".", "_"): path for path, ldm in ldm_by_path.items()}
    layers = named_copies([(name, unet.get_submodule(path)) for name, path in path_of.items()])
    weights, mapped, unmatched = a1111_apply(file, layers, networks)
    return {path_of[name]: weight for name, weight in weights.items()}, mapped, unmatched


# --- ED-LoRA as kohya ---------------------------------------------------------------------------

def lora_concept(unet: nn.Module, text_encoder: nn.Module, seed: int) -> tuple[dict[str, torch.Tensor], dict]:
    """Saved-ED-LoRA-shaped tensors (``unet.<path>.lora_A.weight`` ...) and meta, trained-looking values."""
    from conceptflow.methods.edlora.lora import TEXT_ATTENTION_LINEARS, UNET_ATTENTION_LINEARS

    generator = torch.Generator().manual_seed(seed)
    rank, tensors = 4, {}
    for model_name, model, targets in (("unet", unet, UNET_ATTENTION_LINEARS),
                                       ("text_encoder", text_encoder, TEXT_ATTENTION_LINEARS)):
        for path, module in model.named_modules():
            if not isinstance(module, nn.Linear) or not path.endswith(tuple(f".{t}" for t in targets)):
                continue
            if model_name == "unet" and ".attn" not in path:
                continue
            down = torch.randn(rank, module.in_features, generator=generator)
            up = torch.randn(module.out_features, rank, generator=generator)
            up *= 0.2 * module.weight.norm() / (up @ down).norm()
            tensors[f"{model_name}.{path}.lora_A.weight"], tensors[f"{model_name}.{path}.lora_B.weight"] = down, up
    return tensors, {"alpha": 1.0, "rank": rank}


def write_kohya(tensors: dict[str, torch.Tensor], meta: dict, folder: Path) -> Path:
    from safetensors.torch import save_file

    from conceptflow.methods.edlora.kohya import kohya_state_dict

    path = folder / "kohya.safetensors"
    save_file(kohya_state_dict(tensors, meta["alpha"]), str(path))
    return path


def comfy_lora_weights(file: Path, unet: nn.Module, text_encoder: nn.Module, comfy_lora, comfy_utils
                       ) -> tuple[dict[str, torch.Tensor], int, int]:
    """({"unet.<path>" | "text_encoder.<path>": W}, keys mapped, keys not loaded) through ComfyUI."""
    diffusers_to_ldm = comfy_utils.unet_to_diffusers(COMFY_SD15_UNET_CONFIG)
    to_path = {f"diffusion_model.{ldm}": "unet." + key.removesuffix(".weight")
               for key, ldm in diffusers_to_ldm.items() if key.endswith(".weight")}
    text_keys = {f"clip_l.transformer.{name}": f"text_encoder.{name.removesuffix('.weight')}"
                 for name, _ in text_encoder.named_parameters() if name.endswith(".weight")}
    to_path.update(text_keys)
    unet_model = types.SimpleNamespace(state_dict=lambda: {key: None for key in to_path if key.startswith("diffusion")},
                                       model_config=types.SimpleNamespace(unet_config=COMFY_SD15_UNET_CONFIG))
    clip_model = types.SimpleNamespace(state_dict=lambda: dict.fromkeys(text_keys))
    key_map = comfy_lora.model_lora_keys_clip(clip_model, comfy_lora.model_lora_keys_unet(unet_model, {}))
    not_loaded = _CountingHandler("lora key not loaded")
    logging.getLogger().addHandler(not_loaded)
    try:
        patches = comfy_lora.load_lora(load_file(str(file)), key_map)
    finally:
        logging.getLogger().removeHandler(not_loaded)
    models = {"unet": unet, "text_encoder": text_encoder}
    weights = {}
    for key, patch in patches.items():
        model_name, _, path = to_path[key].partition(".")
        base = models[model_name].get_submodule(path).weight.detach().clone().float()
        weights[to_path[key]] = comfy_lora.calculate_weight([(1.0, patch, 1.0, None, None)], base, key)
    return weights, len(patches), not_loaded.count


def a1111_lora_weights(file: Path, unet: nn.Module, text_encoder: nn.Module, networks: dict,
                       ldm_by_path: dict[str, str]) -> tuple[dict[str, torch.Tensor], int, int]:
    """The same through A1111's Lora extension (UNet and text-encoder layers in one mapping)."""
    path_of = {f"diffusion_model_{ldm}".replace(".", "_"): f"unet.{path}" for path, ldm in ldm_by_path.items()}
    path_of.update({f"transformer_{path}".replace(".", "_"): f"text_encoder.{path}"
                    for path, module in text_encoder.named_modules() if isinstance(module, nn.Linear)})
    models = {"unet": unet, "text_encoder": text_encoder}
    layers = named_copies([(name, models[path.split(".", 1)[0]].get_submodule(path.split(".", 1)[1]))
                           for name, path in path_of.items()])
    weights, mapped, unmatched = a1111_apply(file, layers, networks)
    return {path_of[name]: weight for name, weight in weights.items()}, mapped, unmatched


def lora_errors(weights: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], bases: dict[str, torch.Tensor]
                ) -> tuple[list[float], list[float]]:
    to_weight, to_update = [], []
    for path, target in expected.items():
        error = (weights.get(path, bases[path]) - target).norm()
        to_weight.append(float(error / target.norm()))
        to_update.append(float(error / (target - bases[path]).norm()))
    return to_weight, to_update


# --- the check --------------------------------------------------------------------------------

def errors(weights: dict[str, torch.Tensor], modules: dict[str, KronaWEDLinear]) -> tuple[list[float], list[float]]:
    """Per layer ‖W_ui − W'‖/‖W'‖ and ‖W_ui − W'‖/‖W' − W0‖ (missing layers count as W_ui = W0)."""
    to_weight, to_update = [], []
    with torch.no_grad():
        for path, module in modules.items():
            expected = module.merged_weight()
            base = module.base_layer.weight.float()
            error = (weights.get(path, base) - expected).norm()
            to_weight.append(float(error / expected.norm()))
            to_update.append(float(error / (expected - base).norm()))
    return to_weight, to_update


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--refs", type=Path, default=Path(os.environ.get("CONCEPTFLOW_INTEROP_REFS", "/work/refs")))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--formats", default="lycoris,diff,lycoris-rows,kohya",
                        help="comma-separated subset of lycoris, diff, lycoris-rows, kohya")
    args = parser.parse_args()
    args.formats = set(args.formats.split(","))
    comfy_root, lora_dir = args.refs / "comfyui", args.refs / "a1111" / "extensions-builtin" / "Lora"
    if not (comfy_root / "comfy" / "lora.py").is_file() or not (lora_dir / "networks.py").is_file():
        print(f"skipped: the loaders' sources are not under {args.refs} (want {comfy_root}/comfy/lora.py and "
              f"{lora_dir}/networks.py; see this script's docstring for what to fetch)")
        return
    torch.set_num_threads(args.threads)
    for name in ("comfyui", "a1111"):
        commit = args.refs / name / "COMMIT"
        print(f"{name}: {args.refs / name} at {commit.read_text().strip() if commit.is_file() else 'unknown commit'}")

    comfy_lora, comfy_utils = comfy_loader(comfy_root)
    networks = a1111_loader(lora_dir)
    torch.manual_seed(args.seed)
    unet = UNet2DConditionModel(**SD15_UNET_CONFIG).eval().requires_grad_(False)
    paths = attention_linear_paths(unet)
    ldm_by_path = {key.removesuffix(".weight"): ldm.removesuffix(".weight")
                   for key, ldm in comfy_utils.unet_to_diffusers(COMFY_SD15_UNET_CONFIG).items()
                   if key.removesuffix(".weight") in set(paths)}
    weight_count = sum(unet.get_submodule(p).weight.numel() for p in paths)
    print(f"SD-1.5 UNet (random weights): {len(paths)} attention linears, {weight_count / 1e6:.1f} M weights")

    rows, worst = [], 0.0
    with tempfile.TemporaryDirectory(prefix="interop-") as folder:
        modules = {axis: trained_modules(unet, axis, args.seed + i) for i, axis in enumerate(("rows", "columns"))}
        for name, axis in FORMATS:
            if name not in args.formats:
                continue
            file = write_format(name, modules[axis], Path(folder))
            size = file.stat().st_size / 1e6
            for loader, run in (("ComfyUI", lambda: comfy_weights(file, unet, comfy_lora, comfy_utils)),
                                ("A1111", lambda: a1111_weights(file, unet, networks, ldm_by_path))):
                weights, mapped, unmatched = run()
                to_weight, to_update = errors(weights, modules[axis])
                rows.append((f"{name} ({axis})", f"{size:.1f} MB", loader, f"{mapped}/{len(paths)}", unmatched,
                             max(to_weight), sorted(to_weight)[len(to_weight) // 2], max(to_update)))
                if name in COMPATIBLE:
                    worst = max(worst, max(to_weight)) if mapped == len(paths) else float("inf")
        if "kohya" in args.formats:
            text_encoder = CLIPTextModel(CLIPTextConfig(**SD15_TEXT_CONFIG)).eval().requires_grad_(False)
            tensors, meta = lora_concept(unet, text_encoder, args.seed + 2)
            models = {"unet": unet, "text_encoder": text_encoder}
            bases = {path: models[path.split(".", 1)[0]].get_submodule(path.split(".", 1)[1]).weight.detach().float()
                     for path in edlora_deltas(tensors, meta)}
            expected = {path: bases[path] + delta for path, delta in edlora_deltas(tensors, meta).items()}
            file = write_kohya(tensors, meta, Path(folder))
            size = file.stat().st_size / 1e6
            for loader, run in (("ComfyUI", lambda: comfy_lora_weights(file, unet, text_encoder, comfy_lora, comfy_utils)),
                                ("A1111", lambda: a1111_lora_weights(file, unet, text_encoder, networks, ldm_by_path))):
                weights, mapped, unmatched = run()
                to_weight, to_update = lora_errors(weights, expected, bases)
                rows.append(("kohya (ED-LoRA)", f"{size:.1f} MB", loader, f"{mapped}/{len(expected)}", unmatched,
                             max(to_weight), sorted(to_weight)[len(to_weight) // 2], max(to_update)))
                worst = max(worst, max(to_weight)) if mapped == len(expected) else float("inf")
    header = ("format (axis)", "file", "loader", "keys mapped", "unmatched", "max rel err", "median", "max vs update")
    print(f"{header[0]:<22} {header[1]:>9} {header[2]:>8} {header[3]:>12} {header[4]:>9} {header[5]:>12} "
          f"{header[6]:>10} {header[7]:>14}")
    for row in rows:
        print(f"{row[0]:<22} {row[1]:>9} {row[2]:>8} {row[3]:>12} {row[4]:>9} {row[5]:>12.2e} {row[6]:>10.2e} "
              f"{row[7]:>14.2e}")
    verdict = "meets" if worst <= GOAL else "MISSES"
    print(f"(goal <= {GOAL:g} for the formats called compatible: {verdict}; lycoris-rows is shown for contrast)")
    print(f"interop max relative error = {worst:.2e} (formats: {', '.join(COMPATIBLE)})")


if __name__ == "__main__":
    main()
