"""The leaderboard site: ``results/site/``, static HTML that works from ``file://`` (built by ``aggregate``).

``bench.site.build.build_site`` is the entry point; ``catalog`` reads the methods' metadata, ``kept``
draws kept-token pictures with the harness's own selection code, ``figures`` makes the plotly figures
and ``pages`` renders the HTML.
"""
