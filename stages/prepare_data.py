"""prepare-data: the source's images as uint8 arrays, split into train, val and test.

    python -m stages.prepare_data        # or: dvc repro prepare-data

Writes data/prepared/{train,val,test}_{images,labels}.npy and manifest.json, an image at a
time: memory does not grow with the data. The same params (data.split_seed among them; the
training seed is not) give byte-identical files.
"""

from stages.data import arrays, sources
from stages.pipeline import outputs, params
from stages.pipeline.errors import run_stage


def main():
    p = params.load()
    with outputs.replaced(outputs.PREPARED) as partial:
        manifest = sources.prepare(p.data, partial)
    counts = ", ".join(f"{name} {manifest['splits'][name]['count']}" for name in arrays.SPLITS)
    print(f"prepared {p.data.source}: {counts} images in {len(manifest['classes'])} classes, "
          f"stored at {manifest['stored_size']['side']} px")


if __name__ == "__main__":
    run_stage(main)
