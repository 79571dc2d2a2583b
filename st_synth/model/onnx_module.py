"""An ONNX Runtime input module for sentence-transformers: the exported backbone of an e5-style embedder.

``st-synth export`` writes this file into the exported folder as ``modeling_st_synth_onnx.py`` and names its
class in ``modules.json``, the way Hub models with their own modules do, so the folder loads with

    SentenceTransformer(folder, trust_remote_code=True)

anywhere ``onnxruntime`` is installed (st-synth itself is not needed). It replaces sentence-transformers'
``Transformer`` and nothing else: the tokenizer (with its EOS-ending post-processor), the named prompts, the
``Pooling("lasttoken")`` and ``Normalize`` modules are the model's own. sentence-transformers' own ONNX
backend (``backend="onnx"``) needs the optimum library, which cannot export every decoder with every
transformers version; this module needs only ``onnxruntime``.

``model_kwargs`` choose the graph and the execution provider, as for sentence-transformers' ONNX backend:
``{"file_name": "onnx/model_int8.onnx"}``, ``{"provider": "CUDAExecutionProvider"}``.

This file must stay self-contained: it is copied next to the model and imported from there.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from sentence_transformers.base.modules import InputModule

CONFIG_FILE = "st_synth_onnx_config.json"
ONNX_FOLDER = "onnx"
MODEL_KWARGS = ("file_name", "provider", "session_options")


def _onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "This model runs on ONNX Runtime: pip install onnxruntime (or onnxruntime-gpu)."
        ) from error
    return onnxruntime


class OnnxTransformer(InputModule):
    """Tokenizes like sentence-transformers' ``Transformer`` and runs the exported backbone in ONNX Runtime.

    Args:
        model_dir: The folder holding the tokenizer files and ``onnx/``.
        max_seq_length: Inputs are cut to this many tokens (the tokenizer's post-processor keeps the EOS).
        embedding_dimension: Width of the backbone's hidden states.
        file_name: The graph to run, relative to ``model_dir``.
        provider: An ONNX Runtime execution provider; default the first one available.
        session_options: Keyword arguments set on ``onnxruntime.SessionOptions`` (e.g. intra_op_num_threads).
    """

    config_file_name = CONFIG_FILE
    config_keys: ClassVar[list[str]] = ["max_seq_length", "embedding_dimension", "file_name"]
    save_in_root = True

    def __init__(
        self,
        model_dir: str,
        max_seq_length: int,
        embedding_dimension: int,
        file_name: str = f"{ONNX_FOLDER}/model.onnx",
        provider: str | None = None,
        session_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        from transformers import AutoTokenizer

        ort = _onnxruntime()
        self.model_dir = Path(model_dir)
        self.max_seq_length = int(max_seq_length)
        self.embedding_dimension = int(embedding_dimension)
        self.file_name = file_name
        graph = self.model_dir / file_name
        if not graph.is_file():
            found = sorted(
                str(p.relative_to(self.model_dir)) for p in self.model_dir.glob(f"{ONNX_FOLDER}/*.onnx")
            )
            raise FileNotFoundError(
                f"No ONNX graph {file_name!r} in {self.model_dir}; it has {found or 'none'}."
            )
        available = ort.get_available_providers()
        if provider is not None and provider not in available:
            raise ValueError(
                f"ONNX Runtime provider {provider!r} is not available here; choose from {available}."
            )
        options = ort.SessionOptions()
        for name, value in (session_options or {}).items():
            if not hasattr(options, name):
                raise ValueError(f"onnxruntime.SessionOptions has no setting {name!r}.")
            setattr(options, name, value)
        self.session = ort.InferenceSession(str(graph), options, providers=[provider or available[0]])
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))

    def preprocess(self, inputs: list[str], prompt: str | None = None, **kwargs: Any) -> dict[str, Any]:
        if not all(isinstance(text, str) for text in inputs):
            raise ValueError("The ONNX export embeds text only: pass strings.")
        texts = [prompt + text for text in inputs] if prompt else list(inputs)
        return dict(
            self.tokenizer(
                texts,
                padding=True,
                truncation="longest_first",
                max_length=kwargs.get("max_length") or self.max_seq_length,
                return_tensors="pt",
            )
        )

    def forward(self, features: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        feeds = {
            "input_ids": features["input_ids"].cpu().numpy().astype(np.int64),
            "attention_mask": features["attention_mask"].cpu().numpy().astype(np.int64),
        }
        (hidden,) = self.session.run(["last_hidden_state"], feeds)
        features["token_embeddings"] = torch.from_numpy(hidden).to(features["attention_mask"].device)
        return features

    def get_embedding_dimension(self) -> int:
        return self.embedding_dimension

    def get_word_embedding_dimension(self) -> int:
        return self.embedding_dimension

    def save(self, output_path: str, *args: Any, **kwargs: Any) -> None:
        output = Path(output_path)
        if output.resolve() != self.model_dir.resolve():
            shutil.copytree(self.model_dir / ONNX_FOLDER, output / ONNX_FOLDER, dirs_exist_ok=True)
        self.save_tokenizer(str(output))
        self.save_config(str(output))

    @classmethod
    def load(
        cls,
        model_name_or_path: str,
        subfolder: str = "",
        token: bool | str | None = None,
        cache_folder: str | None = None,
        revision: str | None = None,
        local_files_only: bool = False,
        model_kwargs: dict[str, Any] | None = None,
        backend: str = "onnx",
        **kwargs: Any,
    ) -> OnnxTransformer:
        if backend not in ("torch", "onnx"):
            raise ValueError(
                f"This is an ONNX export: load it with backend='onnx' (or the default), not {backend!r}."
            )
        local = cls.load_dir_path(
            model_name_or_path,
            subfolder=subfolder,
            token=token,
            cache_folder=cache_folder,
            revision=revision,
            local_files_only=local_files_only,
        )
        config = json.loads((Path(local) / CONFIG_FILE).read_text(encoding="utf-8"))
        options = {key: value for key, value in (model_kwargs or {}).items() if value is not None}
        unknown = sorted(set(options) - set(MODEL_KWARGS))
        if unknown:
            raise ValueError(
                f"Unknown model_kwargs {unknown} for the ONNX export; valid: {list(MODEL_KWARGS)}."
            )
        config.update(options)
        return cls(model_dir=local, **config)
