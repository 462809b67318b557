"""Models in and out: model references and configs (:mod:`.models`), read-only views of weights by HF tensor
name (:mod:`.checkpoint`, :mod:`.safetensors`), and the staged writer every output goes through
(:mod:`.files`)."""
