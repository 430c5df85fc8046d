"""Class-incremental learning on a frozen pretrained backbone (SPEC section 8).

No task label at test time: a model's ``forward(x)`` scores every class seen so far,
column ``c`` for global class id ``c``. Training an experience takes no gradient step
(APER's first experience aside): one pass over its data updates class statistics, from
which the classifier is computed. Each method is a plugin for any ``SupervisedTemplate``
and a strategy (the template with the plugin):
  * :mod:`.plugins`: the shared plugin and strategy base, the pass over an experience;
  * :mod:`.prototypes`: SimpleCIL, a cosine classifier over class-mean features, and the
    frozen backbone the methods share;
  * :mod:`.ranpac`: RanPAC, a ridge classifier on randomly projected features;
  * :mod:`.aper`: APER, SimpleCIL on pretrained and once-adapted features concatenated.
"""
from .aper import APER, APERClassifier, APERPlugin
from .prototypes import FrozenBackbone, PrototypeClassifier, SimpleCIL, SimpleCILPlugin
from .ranpac import RanPAC, RanPACClassifier, RanPACPlugin

__all__ = ["APER", "APERClassifier", "APERPlugin", "FrozenBackbone", "PrototypeClassifier",
           "RanPACClassifier", "RanPAC", "RanPACPlugin", "SimpleCIL", "SimpleCILPlugin"]
