"""Quality control of a registration, and accuracy against a known truth.

`plan` settles what QC reads; `jacobian` (det J of x ↦ x + u(x), chunk by chunk) and
`similarity` (before and after, on a coarse lattice) measure, brick by brick, in
`measure`; `stages` summarises the block tables; `slices` reads the pictures' planes and
`pictures` draws them (matplotlib, imported only there); `report` holds qc.json and the
verdict, `page` the offline index.html; `check` runs the steps in one process. The QC
flow (flows/qc.py) runs the same steps as tasks on Dask.
"""

from dreg.qc.accuracy import field_error

__all__ = ["field_error"]
