"""livecomments: post a comment, store it durably, fan it out live to everyone watching the post."""

__version__ = "0.1.0"
