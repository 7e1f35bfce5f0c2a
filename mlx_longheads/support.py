"""Which models this project converts, and the one error every bad model input raises."""

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")


class ModelError(ValueError):
    """A model path, file or repo that cannot become an MLX model; the message names the fix."""


def require_architecture(model_type: str, source: str, supported=ARCHITECTURES) -> None:
    """LongHeads patches the attention of these mlx-lm models only."""
    if model_type not in supported:
        raise ModelError(
            f"{source}: architecture {model_type!r} is not supported; "
            f"use a {', '.join(supported)} model"
        )
