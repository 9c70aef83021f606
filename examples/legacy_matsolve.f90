! A legacy-style Fortran solver, used as a black box by examples/legacy_executable.py and the tests.
!
! For each column b of B it solves  A x + c x**3 = b  (c = 0.1, the cube taken per component) with its
! own Newton iteration and Gaussian elimination. Both matrices are read with list-directed reads, which
! fill them column by column; X is written column by column, three numbers per line, with a D24.16 edit
! descriptor (0.2000000000000000D+01, and 0.1000000000000000-299 when the exponent has three digits).
!
! Usage: legacy_matsolve INPUT OUTPUT     (INPUT holds A (3x3) then B (3x2); status 2 if Newton fails)
program legacy_matsolve
  implicit none
  integer, parameter :: dp = kind(1.0d0), n = 3, m = 2
  real(dp), parameter :: c = 0.1_dp
  real(dp) :: a(n, n), b(n, m), x(n, m), jac(n, n), r(n), dx(n)
  character(len=4096) :: input, output
  integer :: i, j, it

  call get_command_argument(1, input)
  call get_command_argument(2, output)
  open (10, file=trim(input), status='old', action='read')
  read (10, *) a
  read (10, *) b
  close (10)

  x = 0.0_dp
  do j = 1, m
    do it = 1, 60
      r = matmul(a, x(:, j)) + c*x(:, j)**3 - b(:, j)
      jac = a
      do i = 1, n
        jac(i, i) = jac(i, i) + 3.0_dp*c*x(i, j)**2
      end do
      call gauss(jac, -r, dx)
      x(:, j) = x(:, j) + dx
      if (maxval(abs(dx)) <= 1.0e-15_dp*(1.0_dp + maxval(abs(x(:, j))))) exit
    end do
    if (it > 60) then
      write (0, *) 'legacy_matsolve: Newton did not converge for column', j
      stop 2
    end if
  end do

  open (11, file=trim(output), status='replace', action='write')
  write (11, '(3D24.16)') x
  close (11)

contains

  ! Solves m s = rhs by Gaussian elimination with partial pivoting (m and rhs are copies).
  subroutine gauss(m, rhs, s)
    real(dp), intent(in) :: m(n, n), rhs(n)
    real(dp), intent(out) :: s(n)
    real(dp) :: w(n, n + 1), row(n + 1)
    integer :: k, p, q
    w(:, 1:n) = m
    w(:, n + 1) = rhs
    do k = 1, n
      p = k - 1 + maxloc(abs(w(k:n, k)), 1)
      if (abs(w(p, k)) == 0.0_dp) then
        write (0, *) 'legacy_matsolve: singular Jacobian'
        stop 3
      end if
      row = w(k, :)
      w(k, :) = w(p, :)
      w(p, :) = row
      do q = k + 1, n
        w(q, :) = w(q, :) - w(q, k)/w(k, k)*w(k, :)
      end do
    end do
    do k = n, 1, -1
      s(k) = (w(k, n + 1) - dot_product(w(k, k + 1:n), s(k + 1:n)))/w(k, k)
    end do
  end subroutine gauss

end program legacy_matsolve
