import torch, time
from optim.stiefel import orthogonal_, polar_newton_schulz
from optim.stiefel.optimizers import orthogonal_sampling_step_
x=orthogonal_(torch.empty(60,5)); g=torch.randn(60,5)
gen=torch.Generator(); 
t=time.time()
for i in range(100): gen.manual_seed(i); orthogonal_sampling_step_(x,g,rank=20,lr=0.01,core='qr',generator=gen)
print((time.time()-t)/100*1e3,'ms')
t=time.time()
for i in range(100): q=torch.linalg.qr(torch.randn(60,20))
print((time.time()-t)/100*1e3,'ms qr')
t=time.time()
for i in range(100): polar_newton_schulz(x+0.01*g)
print((time.time()-t)/100*1e3,'ms ns')
