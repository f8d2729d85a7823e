"""nanoforge: train a large language model step by step, from a web corpus to a served chat model.

    nanoforge demo            # the whole path on a laptop CPU
    nanoforge --help          # every stage
"""

__version__ = "0.1.0"
