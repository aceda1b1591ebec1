"""Text templates that turn class names into prompts for the teacher's text tower.

The exact strings of the official code: VL2V reads class folder names with "_" as spaces and
no final period; RISE keeps the folder names as they are (underscores included).
"""
from cache.errors import UserError

TEMPLATE_SETS = {
    # The single prompt of the official VL2V code (prompt_style 2).
    "photo": ("a photo of a {}",),
    # The 7-template ensemble of the official RISE code (selected from CLIP's ImageNet prompts).
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
RISE_TEMPLATES = TEMPLATE_SETS["rise7"]
RISE_ANCHOR_TEMPLATE = "a {anchor} of a {cls}"  # RISE's relative-distance prompts, no period

# RISE's relative-distance anchors where domain names do not describe a style.
GENERIC_ANCHORS = ("bright photo", "corrupted photo", "dark photo", "good photo")


def anchor_prompts(anchor: str, classes: list) -> list:
    """RISE's "a {anchor} of a {class}" for every class, names as they are (e.g. "a art_painting of a dog")."""
    return [RISE_ANCHOR_TEMPLATE.format(anchor=anchor, cls=c) for c in classes]


def class_prompt_name(folder_name: str) -> str:
    """VL2V's prompt name of a class folder: ``Alarm_Clock`` reads ``Alarm Clock``."""
    return folder_name.replace("_", " ")


def templates_named(name: str) -> tuple:
    if name not in TEMPLATE_SETS:
        raise UserError(f"unknown template set '{name}'; choose from {', '.join(TEMPLATE_SETS)}")
    return TEMPLATE_SETS[name]
