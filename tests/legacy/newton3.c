/* A "legacy" solver: Newton's method for a 3-equation nonlinear system.
 *
 *   F0 = 4 x0 + x0^3 + a x1 x2          - p0
 *   F1 = 4 x1 + a sin(x0) + x1^3         - p1
 *   F2 = 4 x2 + a tanh(x0 - x1) + x2^3/2 - p2
 *
 * Usage: newton3 INPUT OUTPUT. INPUT holds p0 p1 p2 on the first line and a on the second
 * (blackbox_diff's io="text" protocol); OUTPUT receives x0 x1 x2. Exit status 2 if Newton fails.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

static void residual(const double *x, const double *p, double a, double *F) {
    F[0] = 4 * x[0] + x[0] * x[0] * x[0] + a * x[1] * x[2] - p[0];
    F[1] = 4 * x[1] + a * sin(x[0]) + x[1] * x[1] * x[1] - p[1];
    F[2] = 4 * x[2] + a * tanh(x[0] - x[1]) + 0.5 * x[2] * x[2] * x[2] - p[2];
}

static void jacobian(const double *x, double a, double J[3][3]) {
    double s = 1.0 / cosh(x[0] - x[1]);
    J[0][0] = 4 + 3 * x[0] * x[0]; J[0][1] = a * x[2];              J[0][2] = a * x[1];
    J[1][0] = a * cos(x[0]);       J[1][1] = 4 + 3 * x[1] * x[1];   J[1][2] = 0;
    J[2][0] = a * s * s;           J[2][1] = -a * s * s;             J[2][2] = 4 + 1.5 * x[2] * x[2];
}

/* Solve J d = b by Gaussian elimination with partial pivoting; returns 0 if singular. */
static int solve3(double J[3][3], double *b, double *d) {
    for (int k = 0; k < 3; k++) {
        int piv = k;
        for (int i = k + 1; i < 3; i++) if (fabs(J[i][k]) > fabs(J[piv][k])) piv = i;
        if (fabs(J[piv][k]) < 1e-300) return 0;
        for (int j = 0; j < 3; j++) { double t = J[k][j]; J[k][j] = J[piv][j]; J[piv][j] = t; }
        double t = b[k]; b[k] = b[piv]; b[piv] = t;
        for (int i = k + 1; i < 3; i++) {
            double m = J[i][k] / J[k][k];
            for (int j = k; j < 3; j++) J[i][j] -= m * J[k][j];
            b[i] -= m * b[k];
        }
    }
    for (int i = 2; i >= 0; i--) {
        double s = b[i];
        for (int j = i + 1; j < 3; j++) s -= J[i][j] * d[j];
        d[i] = s / J[i][i];
    }
    return 1;
}

int main(int argc, char **argv) {
    if (argc != 3) { fprintf(stderr, "usage: %s INPUT OUTPUT\n", argv[0]); return 64; }
    FILE *in = fopen(argv[1], "r");
    if (!in) { perror(argv[1]); return 66; }
    double p[3], a;
    if (fscanf(in, "%lf %lf %lf %lf", &p[0], &p[1], &p[2], &a) != 4) {
        fprintf(stderr, "newton3: expected 4 numbers (p0 p1 p2 a) in %s\n", argv[1]);
        return 65;
    }
    fclose(in);
    double x[3] = {0, 0, 0}, F[3], J[3][3], d[3];
    int converged = 0;
    for (int it = 0; it < 100 && !converged; it++) {
        residual(x, p, a, F);
        double b[3] = {-F[0], -F[1], -F[2]};
        jacobian(x, a, J);
        if (!solve3(J, b, d)) { fprintf(stderr, "newton3: singular Jacobian at iteration %d\n", it); return 2; }
        double step = 0, size = 0;
        for (int i = 0; i < 3; i++) {
            x[i] += d[i];
            step = fmax(step, fabs(d[i]));
            size = fmax(size, fabs(x[i]));
        }
        converged = step <= 1e-15 * (1 + size);
    }
    residual(x, p, a, F);
    if (!converged && fmax(fabs(F[0]), fmax(fabs(F[1]), fabs(F[2]))) > 1e-12) {
        fprintf(stderr, "newton3: no convergence after 100 iterations\n");
        return 2;
    }
    FILE *out = fopen(argv[2], "w");
    if (!out) { perror(argv[2]); return 73; }
    fprintf(out, "%.17g %.17g %.17g\n", x[0], x[1], x[2]);
    fclose(out);
    return 0;
}
