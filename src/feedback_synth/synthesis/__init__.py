"""What to synthesise and what to keep: feedback extraction (class statistics), the generation plan,
the filters.
"""
