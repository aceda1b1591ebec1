"""Text templates that turn class names into prompts for the teacher's text tower."""
from cache.errors import UserError

TEMPLATE_SETS = {
    # The default prompt of the official VL2V code.
    "photo": ("a photo of a {}.",),
    # The 7-template ensemble used by RISE (selected from CLIP's ImageNet prompts).
    "rise7": (
        "itap of a {}.",
        "a bad photo of the {}.",
        "a origami {}.",
        "a photo of the large {}.",
        "a {} in a video game.",
        "art of the {}.",
        "a photo of the small {}.",
    ),
    # Domain-agnostic style prompts.
    "styles": (
        "a photo of a {}.",
        "a sketch of a {}.",
        "a cartoon of a {}.",
        "a painting of a {}.",
        "a drawing of a {}.",
    ),
}


# RISE's relative-distance anchors where domain names do not describe a style.
GENERIC_ANCHORS = ("bright photo", "corrupted photo", "dark photo", "good photo")


def anchor_prompts(anchor: str, classes: list) -> list:
    """"a {anchor} of a {class}." for every class, e.g. "a sketch of a dog."."""
    return [f"a {class_prompt_name(anchor)} of a {class_prompt_name(c)}." for c in classes]


def class_prompt_name(folder_name: str) -> str:
    """Folder names such as ``tv_monitor`` read as ``tv monitor`` in prompts."""
    return folder_name.replace("_", " ").strip()


def templates_named(name: str) -> tuple:
    if name not in TEMPLATE_SETS:
        raise UserError(f"unknown template set '{name}'; choose from {', '.join(TEMPLATE_SETS)}")
    return TEMPLATE_SETS[name]
