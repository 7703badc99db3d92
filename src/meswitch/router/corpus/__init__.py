"""The router corpus: labelled text from every packaged source that fits a domain, tagged by source
(:mod:`.sources`), with the templated styles it adds (:mod:`.math_text`, :mod:`.code_text`,
:mod:`.general_text`). It lives with the router because it is built from the router's own text makers."""

from meswitch.router.corpus.sources import QUICK_SOURCES, SOURCES, build_corpus

__all__ = ["QUICK_SOURCES", "SOURCES", "build_corpus"]
