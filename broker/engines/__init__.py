"""Engines: where a broker keeps what must survive.

``embedded`` (the default) keeps everything in the local ``storage/`` log of one data
directory. The boundary every engine implements, and every front end calls, is in
:mod:`broker.engines.base`.
"""
