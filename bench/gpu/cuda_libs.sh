# Sourced by the bench/gpu scripts: put the CUDA user-space libraries PyTorch's wheels installed (cuBLAS,
# cuRAND, NVRTC, cudart 13) on LD_LIBRARY_PATH for the carried qgate binaries.
LIBS=$(find / -xdev \( -name 'libcublas.so.13' -o -name 'libcurand.so.10' -o -name 'libnvrtc.so.13' -o -name 'libcudart.so.13' \) 2>/dev/null | xargs -r -n1 dirname | sort -u | tr '\n' ':')
export LD_LIBRARY_PATH=${LIBS}${LD_LIBRARY_PATH:-}
