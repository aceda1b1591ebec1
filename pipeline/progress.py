"""Progress bars that stay quiet when output is not a terminal."""
import sys

from tqdm import tqdm


def progress(**kwargs):
    return tqdm(disable=not sys.stderr.isatty(), dynamic_ncols=True, leave=False, **kwargs)
