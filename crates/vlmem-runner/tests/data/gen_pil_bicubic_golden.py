from PIL import Image
def img(w,h):
    im = Image.new('RGB',(w,h))
    im.putdata([((x*37+y*91)%256, (x*11+y*201+53)%256, (x*x+y*7+106)%256) for y in range(h) for x in range(w)])
    return im
def fnv(b):
    h=0xcbf29ce484222325
    for x in b:
        h^=x; h=(h*0x100000001b3)&0xffffffffffffffff
    return h
src=img(13,7)
for (w,h) in [(20,11),(5,3),(9,15),(13,4)]:
    out=src.resize((w,h),Image.BICUBIC)
    print((w,h), list(out.tobytes()))
fx=Image.open('/work/main/fixtures/qwen3-vl-tiny/image0.png').convert('RGB')
for (w,h) in [(224,160),(448,352),(96,64)]:
    out=fx.resize((w,h),Image.BICUBIC)
    print('fixture',(w,h), hex(fnv(out.tobytes())), list(out.tobytes()[:12]))
