"""tools/scenes: the synthetic scene world (see scenes.py). Import it as a
package (from scenes import make_scene, ...) with tools/ on sys.path."""
from .scenes import *  # noqa: F401,F403
from .scenes import main  # noqa: F401
