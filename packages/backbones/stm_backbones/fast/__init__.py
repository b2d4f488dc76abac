"""The blocks' fast kernels, one concern per module; each computes the same function as the plain formulation
in the model files (up to float rounding) with fewer passes over memory or a faster kernel. Blocks choose
them through the single switch in `stm_backbones.fast_paths`.

* `residual`: residual branches `x + drop_path(γ·f(x))` as one fused pass / the GEMM's accumulator;
* `mlp`: the GELU MLP branch in cache-sized row chunks, accumulating into the residual;
* `softmax`: softmax over short rows (DCNv3's 9 points) and softmax with denormals flushed (Swin's masks);
* `depthwise`: the depth-wise convolution's weight gradient at convolution speed (ConvNeXt);
* `convnext`: the ConvNeXt block channels-last end to end (1x1 convs as GEMMs on the tokens);
* `windows`, `swin`: Swin's cyclic shift + window partition as one token gather, one cached additive mask,
  fused attention;
* `pvt`: PVT's spatial-reduction attention as one fused SDPA call, γ folded into `proj`;
* `halo`: HaloNet's k/v windows with a strided-add backward and its additive position/key mask;
* `dcn`: DCNv3's sampling with padding and the location transform folded into one GEMM;
* `autocast`: small autocast queries shared by the kernels.
"""
