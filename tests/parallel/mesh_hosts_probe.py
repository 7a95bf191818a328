"""Run by tests/parallel/test_mesh.py in each of several processes: builds the mesh with
dcn_data = sys.argv[1] and prints, per dcn row, the process ids of its devices."""
import sys


from deepseek_jax import parallel as par

par.maybe_initialize_distributed()
mesh = par.make_mesh({"dcn_data": int(sys.argv[1]), "fsdp": -1})
rows = [sorted({d.process_index for d in row.ravel()}) for row in mesh.devices]
print("ROWS", rows, flush=True)
