"""Files under an ArrayRecord source: a bounded pool of open readers, the listing that identifies
an indexed set, parallel opening, and windowed block reads.
"""
