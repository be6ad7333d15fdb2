# usage: cases.sh "<python -c prefix>"
Q="$1"
cd /tmp/hostile/work && rm -rf * && mkdir -p afile_dir
python3 - <<'P'
import json
c=json.load(open('/work/main/tests/fixtures/configs/llama-tied.json'))
json.dump(dict(c, vocab_size=0), open('vocab0.json','w'))
json.dump(dict(c, num_hidden_layers=10_000_000), open('layers.json','w'))
d=dict(c); d.pop('hidden_size'); json.dump(d, open('nohidden.json','w'))
open('nonutf8.json','wb').write(b'{"model_type": "llama\xff"}')
open('deep.json','w').write('{"model_type":"llama","x":'+'['*100000+']'*100000+'}')
open('afile','w').write('x')
P
run() { name=$1; shift; timeout 30 $Q "$@" >/dev/null 2>err.txt; rc=$?; l=$(grep -c . err.txt); tb=$(grep -c "Traceback\|internal error" err.txt); echo "$name: exit $rc, stderr lines $l, traceback/internal $tb"; }
run alpha-inf estimate --model smollm2-135m --alpha inf
run fit-top0 fit --model smollm2-135m --gpu t4 --top 0
run gpu-empty estimate --model smollm2-135m --gpu ""
run vocab0 estimate --model ./vocab0.json
run layers-10M estimate --model ./layers.json
run nonutf8 estimate --model ./nonutf8.json
run deep-json estimate --model ./deep.json
run r-huge estimate --model smollm2-135m --r 10000000000000000000000000000000000000000
run long-output estimate --model smollm2-135m --output $(printf 'x%.0s' {1..300}).json
run no-hidden estimate --model ./nohidden.json
QPLAN_SPEC_DIR=/tmp/hostile/work/specs run shadow spec add /work/main/tests/fixtures/configs/llama-tied.json --name smollm2-135m
