
from kvpress.paged.pool import DEFAULT_PAGE_SIZE, BlockPool
from kvpress.paged.prefix_cache import PrefixCache, PrefixHit
from kvpress.paged.radix import RadixNode, RadixTree
