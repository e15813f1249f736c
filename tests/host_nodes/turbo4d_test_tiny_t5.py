"""Test-only ComfyUI node: ComfyUI's own T5 v1.1 XXL text encoder (its `sd3` CLIP with T5 alone: no
attention mask, the T5 tokenizer) built at the width of the weights file it loads.

Why it exists: ComfyUI's CLIPLoader recognises a T5 XXL only by its full-size tensors (24 blocks,
4096 wide) and always builds the full 4.8 B-parameter encoder from its config file, which a 2-core
CPU test cannot hold or run. This node builds the same classes (comfy.sd.CLIP, sd3_clip's
T5XXLModel, comfy.text_encoders.t5.T5, SD3Tokenizer) through ComfyUI's own per-model config
override (`t5xxl_model_config`), with the widths read from the file, and loads the file with
ComfyUI's load_sd. The test places it in its throwaway ComfyUI's custom_nodes; the pack never ships it.
"""
import folder_paths

import comfy.sd
import comfy.text_encoders.sd3_clip as sd3_clip
import comfy.utils


def t5_config(sd: dict) -> dict:
    """The T5 config the tensors imply (gated-GELU v1.1 structure, as t5_config_xxl.json)."""
    heads = sd["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape[1]
    inner = sd["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0]
    layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.block."))
    return {"d_model": sd["shared.weight"].shape[1], "d_ff": sd["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"].shape[0],
            "num_heads": heads, "d_kv": inner // heads, "num_layers": layers, "vocab_size": sd["shared.weight"].shape[0]}


class Turbo4DTestTinyT5Loader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip_name": (folder_paths.get_filename_list("text_encoders"),)}}

    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self, clip_name):
        path = folder_paths.get_full_path_or_raise("text_encoders", clip_name)
        sd = comfy.utils.load_torch_file(path, safe_load=True)

        class Target:
            params = {}
            clip = sd3_clip.sd3_clip(clip_l=False, clip_g=False, t5=True, **sd3_clip.t5_xxl_detect(sd))
            tokenizer = sd3_clip.SD3Tokenizer

        clip = comfy.sd.CLIP(Target, embedding_directory=folder_paths.get_folder_paths("embeddings"),
                             parameters=comfy.utils.calculate_parameters(sd),
                             model_options={"t5xxl_model_config": t5_config(sd)})
        missing, _ = clip.load_sd(sd)
        if missing:
            raise ValueError(f"{clip_name}: tensors missing for ComfyUI's T5: {missing[:3]}")
        return (clip,)


NODE_CLASS_MAPPINGS = {"Turbo4DTestTinyT5Loader": Turbo4DTestTinyT5Loader}
