"""The user's entry points: `implicit` wraps a black box of one's own, `layer` compiles a problem a backend
understands. Both go through the engine's autograd core; `layer` asks the plugin registry for a backend."""

from blackbox_diff.api._implicit import ImplicitFunction, implicit
from blackbox_diff.api._layer import Layer, layer

__all__ = ["ImplicitFunction", "Layer", "implicit", "layer"]
