/* A solver of x^2 = w (x > 0) that misbehaves on request, to test every failure path.
 *
 * Usage: misbehave INPUT OUTPUT, io="text": INPUT holds `mode` on the first line and `w` on the second.
 * mode 0: solve and write x; 1: segfault; 2: hang; 3: print garbage; 4: write two numbers (wrong
 * shape); 5: exit with status 3; 6: write NaN; 7: exit 0 without writing the output.
 */
#include <math.h>
#include <stdio.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 3) { fprintf(stderr, "usage: %s INPUT OUTPUT\n", argv[0]); return 64; }
    FILE *in = fopen(argv[1], "r");
    double mode, w;
    if (!in || fscanf(in, "%lf %lf", &mode, &w) != 2) { fprintf(stderr, "misbehave: bad input\n"); return 65; }
    fclose(in);
    int m = (int)mode;
    fprintf(stderr, "misbehave: mode %d, w = %g\n", m, w);
    if (m == 1) { fprintf(stderr, "misbehave: about to crash\n"); fflush(stderr); *(volatile int *)0 = 1; }
    if (m == 2) { for (;;) pause(); }
    if (m == 5) { fprintf(stderr, "misbehave: giving up: singular matrix\n"); return 3; }
    if (m == 7) return 0;
    double x = w > 1 ? w : 1.0;
    for (int it = 0; it < 200; it++) x = 0.5 * (x + w / x);
    FILE *out = fopen(argv[2], "w");
    if (m == 3) fprintf(out, "x = this is not a number\n");
    else if (m == 4) fprintf(out, "%.17g %.17g\n", x, -x);
    else if (m == 6) fprintf(out, "nan\n");
    else fprintf(out, "%.17g\n", x);
    fclose(out);
    return 0;
}
