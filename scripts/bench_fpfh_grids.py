"""FPFH cost per 224 x 224 cloud for the grids and windows of docs/results.md (thread CPU time, one torch thread).

    python scripts/bench_fpfh_grids.py
"""
import torch, time, sys
torch.set_num_threads(1)
from edge_runtime.methods.cfm.model import FPFHExtractor
import numpy as np
h=224
yy,xx=np.mgrid[0:h,0:h]/h
z=0.5+0.02*np.sin(xx*10)*np.cos(yy*7)
xyz=np.stack([(xx-0.5)*0.2,(yy-0.5)*0.2,z],-1).astype(np.float32); xyz[:30]=0
t=torch.from_numpy(xyz)[None]
def tm(f,n=9):
    f(); ts=[]
    for _ in range(n):
        t0=time.thread_time(); f(); ts.append(time.thread_time()-t0)
    return np.median(ts)*1000
for s,ns,nw,fw in [(2,0,5,11),(4,2,5,5),(4,2,5,7),(4,1,9,5),(4,1,7,5)]:
    e=FPFHExtractor(nw,fw,s,ns)
    with torch.no_grad(): print(s,ns,nw,fw, "%.1f ms CPU"%tm(lambda: e(t)))
