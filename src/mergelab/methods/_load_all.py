"""Import every module that registers built-in methods (one import per module)."""
from . import basic  # noqa: F401  linear, task_arithmetic, slerp
from . import sparse  # noqa: F401  ties, dare_linear, dare_ties, tall_masks, consensus
from . import fisher  # noqa: F401  fisher
from . import regmean  # noqa: F401  regmean
from . import sparsify  # noqa: F401  breadcrumbs, breadcrumbs_ties, della, della_linear
from . import geometric  # noqa: F401  nuslerp, multislerp, karcher, model_stock
from . import select  # noqa: F401  sce, nearswap, arcee_fusion, ram, ramplus_tl, passthrough
