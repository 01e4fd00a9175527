"""triffusion"""
